"""Secure aggregation over real gRPC on loopback, against the same flow with no cryptography.

    python -m benchmarks.secagg --sites 100 --dim 100000 --dropout 0.1 --json OUT
        [--scaling] [--flower-sites 10 | --no-flower] [--profile OUT.prof]

One round each of three modes, every site holding a float32 vector of shape ``(dim,)``:

``plain``
    The baseline (:mod:`benchmarks.secagg_plain`): the same four-phase message flow, over
    the same ``Aggregation`` gRPC service, messages, client
    (:class:`client.secagg_client.AggregationClient`) and poll interval, with no
    cryptography in it. Its server adds every vector into a float64 running sum in memory
    and keeps no journal, audit log or store.
``complete``
    fedlens protocol v2 (Bonawitz et al. 2017) with masks between every pair of sites: the
    real :class:`server.aggregation.Aggregator` behind :func:`server.grpc_server.serve`
    over a SQLite store (journal and audit log included), and
    :func:`client.secagg_client.run_secure_round` at every site.
``secaggplus``
    The same with the SecAgg+ graph of degree
    :func:`privacy.secagg_graph.recommended_degree` (which is the complete graph up to 173
    sites, so at 100 sites this mode runs the same protocol as ``complete``).

``round(dropout * sites)`` sites, chosen by the seed, drop out after the sharing phase by
declining the round instead of sending a vector, in every mode
(:mod:`benchmarks.secagg_sites`). The aggregator therefore has to rebuild their mask keys and
remove their pairwise masks from the survivors' vectors. The threshold is the default,
``floor(2n/3) + 1`` (:mod:`benchmarks.secagg_setup`).

Measurements (:mod:`benchmarks.secagg_round`). The aggregator runs in its own process, one
for the fedlens rounds of one invocation and another for the plain rounds, which reports its
CPU time and its peak resident memory during the round (:mod:`benchmarks.secagg_server`).
Sites run as threads of this process (or of ``--site-workers`` processes), each timed by its
thread's CPU time. The round's wall time runs from ``OpenRound`` to the last site seeing the
round end. ``prg_floor_s`` is the CPU time of expanding, with the protocol's own generator,
exactly the masks the aggregator must remove.
``server_ratio = server_cpu_s / (prg_floor_s + plain_server_cpu_s)`` for the fedlens mode
with the lower server CPU; the target is 1.5.

Every round's released sum is checked against the survivors' vectors (exactly, against their
fixed-point encodings, in the fedlens modes); any mismatch raises
:class:`fedlens.errors.IntegrityError`.

Flower's SecAgg+ (``benchmarks.flower_secaggplus``) runs at ``--flower-sites`` sites when that
module imports and works; otherwise its fields are null and ``flower_error`` says why.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import pstats
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.secagg_round import RoundResult, prg_floor, run_round, verify_released
from benchmarks.secagg_server import ServerProcess
from benchmarks.secagg_setup import FEDLENS_MODES, MODES, codec_for, round_spec
from fedlens.errors import IntegrityError
from privacy import recommended_degree
from privacy.secagg_params import default_threshold

__all__ = [
    "BenchmarkConfig",
    "RoundResult",
    "codec_for",
    "prg_floor",
    "round_spec",
    "run_benchmark",
    "run_rounds",
    "verify_released",
]

logger = logging.getLogger(__name__)

TARGET_RATIO = 1.5


@dataclass(frozen=True)
class BenchmarkConfig:
    sites: int = 100
    dim: int = 100_000
    dropout: float = 0.1
    seed: int = 0
    workers: int = 0
    poll_s: float = 0.05
    timeout_s: float = 600.0
    flower: bool = True
    flower_sites: int = 10
    flower_timeout_s: float = 900.0
    scaling: bool = False
    scaling_dim: int = 10_000
    scaling_site_counts: tuple[int, ...] = (25, 50, 100, 200)
    scaling_sites: int = 25
    scaling_dims: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    profile: Path | None = None


def _run_round(
    server: ServerProcess, mode: str, config: BenchmarkConfig, sites: int, dim: int
) -> RoundResult:
    """One round of ``mode`` at ``sites`` x ``dim`` with the configured dropout and timing."""
    return run_round(
        server,
        mode,
        sites,
        dim,
        config.dropout,
        seed=config.seed,
        workers=config.workers,
        poll_s=config.poll_s,
        timeout_s=config.timeout_s,
    )


def run_rounds(
    modes: Sequence[str], config: BenchmarkConfig, sites: int, dim: int, workdir: Path
) -> dict[str, RoundResult]:
    """One round of each mode at ``sites`` x ``dim``, with one server process per kind."""
    servers: dict[str, ServerProcess] = {}
    try:
        # Both start at once: the fedlens one spends seconds importing.
        for kind in {"plain" if m == "plain" else "fedlens" for m in modes}:
            servers[kind] = ServerProcess(kind, workdir)
        results = {}
        for mode in modes:
            server = servers["plain" if mode == "plain" else "fedlens"]
            logger.info("%s: %d sites x %d, dropout %g", mode, sites, dim, config.dropout)
            results[mode] = _run_round(server, mode, config, sites, dim)
        return results
    finally:
        for server in servers.values():
            server.stop()


def best_mode(results: dict[str, RoundResult]) -> RoundResult:
    """The fedlens mode with the lower server CPU time."""
    return min((results[m] for m in FEDLENS_MODES if m in results), key=lambda r: r.server_cpu_s)


def run_flower(config: BenchmarkConfig) -> dict[str, Any]:
    empty: dict[str, Any] = {"flower_sites": None, "flower_secaggplus_s": None}
    if not config.flower:
        return {**empty, "flower_error": "not run (--no-flower)"}
    try:
        from benchmarks.flower_secaggplus import run_flower_secaggplus

        result: dict[str, Any] = run_flower_secaggplus(
            config.flower_sites, config.dim, config.dropout, timeout_s=config.flower_timeout_s
        )
        if not result.get("checked_sum", False):
            raise IntegrityError(f"Flower's sum did not check: {result}")
        float(result["flower_secaggplus_s"])
        int(result["flower_sites"])
    except Exception as exc:  # any failure of the other module leaves Flower's fields null
        logger.warning("Flower SecAgg+ did not run: %s", exc)
        return {**empty, "flower_error": f"{type(exc).__name__}: {exc}"}
    return result


def run_scaling(config: BenchmarkConfig, workdir: Path) -> dict[str, Any]:
    def point(sites: int, dim: int) -> dict[str, Any]:
        modes = ["complete"]
        if recommended_degree(sites) < sites - 1:
            modes.append("secaggplus")
        results = run_rounds(modes, config, sites, dim, workdir)
        best = best_mode(results)
        return {**best.summary(), "modes_run": modes}

    return {
        "by_sites": [point(n, config.scaling_dim) for n in config.scaling_site_counts],
        "by_dim": [point(config.scaling_sites, d) for d in config.scaling_dims],
        "note": "best fedlens mode (lower server CPU) at each point; server_round_mib is the "
        "server's peak resident memory during the round minus its memory before it",
    }


def run_profile(config: BenchmarkConfig, workdir: Path, out: Path) -> dict[str, Any]:
    """One more complete-graph round with the aggregator's handler threads under cProfile."""
    server = ServerProcess("fedlens", workdir, profile=True)
    try:
        result = _run_round(server, "complete", config, config.sites, config.dim)
    finally:
        server.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    stats = pstats.Stats(result.profile, stream=text)
    stats.dump_stats(str(out))
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return {
        "profile_file": str(out),
        "profiled_server_cpu_s": result.server_cpu_s,
        "profiled_seconds": result.seconds,
        "top": text.getvalue(),
    }


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Every measurement the CLI reports, as one JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="fedlens-secagg-") as tmp:
        workdir = Path(tmp)
        results = run_rounds(MODES, config, config.sites, config.dim, workdir)
        plain, best = results["plain"], best_mode(results)
        assert best.prg_floor_s is not None
        floor = best.prg_floor_s
        report: dict[str, Any] = {
            "benchmark": "secagg",
            "sites": config.sites,
            "dim": config.dim,
            "dropout": config.dropout,
            "dropped": round(config.dropout * config.sites),
            "threshold": default_threshold(config.sites),
            "secaggplus_degree": recommended_degree(config.sites),
            "secaggplus_is_complete_graph": recommended_degree(config.sites) >= config.sites - 1,
            "plain_s": plain.seconds,
            "secagg_s": results["complete"].seconds,
            "secaggplus_s": results["secaggplus"].seconds,
            "best_mode": best.mode,
            "server_cpu_s": best.server_cpu_s,
            "plain_server_cpu_s": plain.server_cpu_s,
            "prg_floor_s": floor,
            "server_ratio": best.server_cpu_s / (floor + plain.server_cpu_s),
            "target_ratio": TARGET_RATIO,
            "site_cpu_s_median": statistics.median(best.site_cpu_s),
            "plain_site_cpu_s_median": statistics.median(plain.site_cpu_s),
            "server_peak_mib": best.server_peak_mib,
            "server_rss_before_mib": best.server_rss_before_mib,
            "plain_server_peak_mib": plain.server_peak_mib,
            "sum_verified": all(r.sum_verified for r in results.values()),
            "modes": {mode: r.summary() for mode, r in results.items()},
        }
        flower = run_flower(config)
        report.update(
            {
                "flower_sites": flower.get("flower_sites"),
                "flower_secaggplus_s": flower.get("flower_secaggplus_s"),
                "flower_error": flower.get("flower_error"),
                "fedlens_at_flower_sites_s": None,
                "flower": flower,
            }
        )
        if report["flower_sites"] is not None:
            at = run_rounds(FEDLENS_MODES, config, int(report["flower_sites"]), config.dim, workdir)
            report["fedlens_at_flower_sites_s"] = best_mode(at).seconds
            report["fedlens_at_flower_sites"] = {m: r.summary() for m, r in at.items()}
        report["scaling"] = run_scaling(config, workdir) if config.scaling else None
        if config.profile is not None:
            report["profile"] = run_profile(config, workdir, config.profile)
    report.update(
        {
            "cores": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_1m": os.getloadavg()[0],
            "site_workers": config.workers,
            "poll_s": config.poll_s,
        }
    )
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['sites']} sites x {report['dim']} float32, dropout {report['dropout']} "
        f"({report['dropped']} dropped), threshold {report['threshold']}, {report['cores']} cores",
        f"{'mode':<11}{'wall s':>9}{'server cpu s':>14}{'site cpu s (med)':>18}"
        f"{'server peak MiB':>17}{'prg floor s':>13}  sum",
    ]
    for mode, r in report["modes"].items():
        floor = "-" if r["prg_floor_s"] is None else f"{r['prg_floor_s']:.3f}"
        lines.append(
            f"{mode:<11}{r['seconds']:>9.2f}{r['server_cpu_s']:>14.3f}"
            f"{r['site_cpu_s_median']:>18.4f}{r['server_peak_mib']:>17.1f}{floor:>13}"
            f"  {'ok' if r['sum_verified'] else 'MISMATCH'}"
        )
    lines.append(
        f"server ratio ({report['best_mode']}): {report['server_cpu_s']:.3f} / "
        f"({report['prg_floor_s']:.3f} + {report['plain_server_cpu_s']:.3f}) = "
        f"{report['server_ratio']:.2f} (target {TARGET_RATIO})"
    )
    if report["flower_sites"] is not None:
        lines.append(
            f"Flower SecAgg+ at {report['flower_sites']} sites: "
            f"{report['flower_secaggplus_s']:.2f} s; fedlens: "
            f"{report['fedlens_at_flower_sites_s']:.2f} s"
        )
    else:
        lines.append(f"Flower SecAgg+: not measured ({report['flower_error']})")
    scaling = report.get("scaling")
    if scaling:
        lines.append(
            f"{'sites':>6}{'dim':>9}{'mode':>12}{'wall s':>9}{'server cpu s':>14}"
            f"{'round MiB':>11}{'peak MiB':>10}"
        )
        for r in scaling["by_sites"] + scaling["by_dim"]:
            lines.append(
                f"{r['sites']:>6}{r['dim']:>9}{r['mode']:>12}{r['seconds']:>9.2f}"
                f"{r['server_cpu_s']:>14.3f}{r['server_round_mib']:>11.1f}"
                f"{r['server_peak_mib']:>10.1f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--site-workers", type=int, default=0, help="site processes (0: threads of this one)"
    )
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between polls")
    parser.add_argument("--timeout", type=float, default=600.0, help="phase timeout, seconds")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--flower-sites", type=int, default=10)
    parser.add_argument("--flower-timeout", type=float, default=900.0)
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--scaling-dim", type=int, default=10_000)
    parser.add_argument("--scaling-site-counts", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--scaling-sites", type=int, default=25)
    parser.add_argument(
        "--scaling-dims", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000]
    )
    parser.add_argument("--profile", type=Path, default=None, help="profile the aggregator")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = BenchmarkConfig(
        sites=args.sites,
        dim=args.dim,
        dropout=args.dropout,
        seed=args.seed,
        workers=args.site_workers,
        poll_s=args.poll,
        timeout_s=args.timeout,
        flower=not args.no_flower,
        flower_sites=args.flower_sites,
        flower_timeout_s=args.flower_timeout,
        scaling=args.scaling,
        scaling_dim=args.scaling_dim,
        scaling_site_counts=tuple(args.scaling_site_counts),
        scaling_sites=args.scaling_sites,
        scaling_dims=tuple(args.scaling_dims),
        profile=args.profile,
    )
    report = run_benchmark(config)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    if "profile" in report:
        print(report["profile"]["top"])


if __name__ == "__main__":
    main()
