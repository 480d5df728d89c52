"""The utility benchmark's report: its accuracy table and its plot.

Kept apart from :mod:`benchmarks.utility`, which trains; both read the JSON-ready
results that :func:`benchmarks.utility.run_benchmark` returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "plot"]


def format_table(results: Mapping[str, Any]) -> str:
    """The accuracy table: one column per ε, rows overall (± std over seeds) and per group."""
    keys = list(results["accuracy"])
    sizes: Mapping[str, int] = results["group_sizes"]
    width = max(len("overall"), *(len(g) for g in sizes))

    def row(label: str, n: str, values: Sequence[float]) -> str:
        return f"{label:<{width}}  {n:>6}  " + "  ".join(f"{v:>7.4f}" for v in values)

    lines = [
        f"{'ε':<{width}}  {'n':>6}  " + "  ".join(f"{k:>7}" for k in keys),
        row("overall", str(results["test_rows"]), [results["accuracy"][k] for k in keys]),
        row("  ± std", "", [results["accuracy_std"][k] for k in keys]),
    ]
    for group, n in sizes.items():
        lines.append(row(group, str(n), [results["group_accuracy"][k][group] for k in keys]))
    return "\n".join(lines)


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Accuracy against ε, one panel per sensitive feature, one line per group.

    The overall accuracy is the bold black line; error bars are the standard deviation
    over seeds; ``ε = inf`` is drawn at twice the largest finite ε.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["accuracy"])
    finite = [float(k) for k in keys if math.isfinite(float(k))]
    far = 2.0 * max(finite) if finite else 1.0
    xs = [float(k) if math.isfinite(float(k)) else far for k in keys]
    features = sorted({g.split("=", 1)[0] for g in results["group_sizes"]})
    fig, axes = plt.subplots(
        1,
        max(1, len(features)),
        figsize=(6 * max(1, len(features)), 5.5),
        sharey=True,
        squeeze=False,
    )
    for ax, feature in zip(axes[0], features or [""], strict=True):
        ax.errorbar(
            xs,
            [results["accuracy"][k] for k in keys],
            yerr=[results["accuracy_std"][k] for k in keys],
            color="black",
            marker="o",
            linewidth=3,
            capsize=4,
            label="overall",
            zorder=3,
        )
        for group, size in results["group_sizes"].items():
            if group.split("=", 1)[0] != feature:
                continue
            ax.errorbar(
                xs,
                [results["group_accuracy"][k][group] for k in keys],
                yerr=[results["group_accuracy_std"][k][group] for k in keys],
                linewidth=1.2,
                capsize=3,
                marker="o",
                markersize=3,
                label=f"{group.split('=', 1)[1]} (n={size})",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [k if k != "inf" else "∞" for k in keys])
        ax.set_xlabel("per-site training ε (δ = {:g})".format(results["settings"]["delta"]))
        ax.set_title(f"test accuracy by {feature}" if feature else "test accuracy")
        ax.grid(True, alpha=0.3)
        ax.minorticks_off()
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    axes[0][0].set_ylabel("accuracy")
    fig.suptitle(
        f"{results['dataset']}: federated DP-SGD, {results['settings']['sites']} sites, "
        f"mean ± std over {len(results['settings']['seeds'])} seed(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
