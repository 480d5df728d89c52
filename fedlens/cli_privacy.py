"""The privacy commands of ``fedlens``: plan a site's budget, read a site's ledger.

::

    fedlens plan                    split a site budget between training and releases
    fedlens client budget           a site's ledger: budget, spend history, what is left

Both run at the site or on an operator's machine and talk to no server.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedlens.errors import ConfigurationError

__all__ = ["add_privacy_commands"]

console = Console()
err_console = Console(stderr=True)


def add_privacy_commands(sub: Any) -> None:
    """Register ``plan`` and ``client budget`` on the top-level subparsers."""
    plan = sub.add_parser(
        "plan",
        help="split a site budget between DP-SGD and releases, before anything runs",
        description="Show how each site's (ε, δ) budget is split between DP-SGD training and "
        "explanation releases, with the resulting noise multipliers, composed exactly as "
        "the site ledger composes them. Exits 2 if the plan does not fit.",
    )
    plan.add_argument("--epsilon", type=float, default=4.0, help="site budget ε (default 4)")
    plan.add_argument("--delta", type=float, default=1e-5, help="site δ (default 1e-5)")
    plan.add_argument(
        "--records",
        type=int,
        action="append",
        help="records at a site (repeat for several sites); default: the dataset's partition",
    )
    plan.add_argument("--dataset", default="adult", help="dataset whose partition gives records")
    plan.add_argument("--sites", type=int, default=4, help="sites of the partition (default 4)")
    plan.add_argument("--seed", type=int, default=0, help="seed of the partition")
    plan.add_argument("--batch-size", type=int, default=256)
    plan.add_argument("--rounds", type=int, default=3, help="training rounds (default 3)")
    plan.add_argument("--local-epochs", type=int, default=2)
    plan.add_argument("--releases", type=int, default=1, help="explanation releases (default 1)")
    plan.add_argument(
        "--training-share",
        type=float,
        default=0.7,
        help="share of ε for training when splitting (default 0.7)",
    )
    plan.add_argument(
        "--train-epsilon",
        type=float,
        help="check a fixed plan: DP-SGD's own ε (with --explain-epsilon)",
    )
    plan.add_argument("--explain-epsilon", type=float, help="check a fixed plan: each release's ε")
    plan.add_argument(
        "--explain-delta", type=float, default=1e-6, help="each release's δ (default 1e-6)"
    )
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=_cmd_plan)

    client = sub.add_parser("client", help="site-side commands")
    csub = client.add_subparsers(dest="client_command", required=True)
    budget = csub.add_parser(
        "budget", help="the site's privacy ledger: budget, spend history, what is left"
    )
    budget.add_argument(
        "--state-dir",
        default="fedlens-site",
        help="the site's state directory (its node config's state-dir)",
    )
    budget.add_argument("--ledger", default="", help="the ledger file (overrides --state-dir)")
    budget.add_argument("--json", action="store_true", help="machine-readable output")
    budget.set_defaults(func=_cmd_client_budget)
    review = csub.add_parser(
        "review",
        help="the site's own records ranked by self-influence (likely mislabelled first); "
        "computed locally, nothing is sent",
    )
    review.add_argument(
        "--state-dir",
        default="fedlens-site",
        help="the site's state directory (its node config's state-dir)",
    )
    review.add_argument("--top", type=int, default=20, help="how many records to list")
    review.add_argument("--json", action="store_true", help="machine-readable output")
    review.set_defaults(func=_cmd_client_review)


def _site_records(args: argparse.Namespace) -> list[int]:
    if args.records:
        return list(args.records)
    from fedlens.datasets import load_dataset
    from fedlens.runconfig import RunConfig

    if not 1 <= args.sites <= 64:
        raise ConfigurationError(f"--sites must be in [1, 64], got {args.sites}")
    run = RunConfig()
    dataset = load_dataset(args.dataset, seed=args.seed)
    return [
        len(
            dataset.site(
                i, args.sites, partition=run.partition, alpha=run.alpha, seed=args.seed
            ).labels
        )
        for i in range(args.sites)
    ]


def _cmd_plan(args: argparse.Namespace, _settings: object) -> int:
    from privacy.planning import BudgetPlan, PlanRequest, check_plan, plan_budget

    fixed = args.train_epsilon is not None or args.explain_epsilon is not None
    if fixed and (args.train_epsilon is None or args.explain_epsilon is None):
        raise ConfigurationError("--train-epsilon and --explain-epsilon go together")
    records = _site_records(args)
    plans: list[BudgetPlan] = []
    with err_console.status("calibrating") as status:
        for i, n in enumerate(records):
            status.update(f"calibrating site {i + 1} of {len(records)} ({n} records)")
            request = PlanRequest(
                budget_epsilon=args.epsilon,
                delta=args.delta,
                records=n,
                batch_size=args.batch_size,
                rounds=args.rounds,
                local_epochs=args.local_epochs,
                releases=args.releases,
                training_share=args.training_share,
            )
            if fixed:
                plans.append(
                    check_plan(
                        request, args.train_epsilon, args.explain_epsilon, args.explain_delta
                    )
                )
            else:
                plans.append(plan_budget(request))
    rows = [_plan_row(i, p) for i, p in enumerate(plans)]
    if args.json:
        print(json.dumps({"budget_epsilon": args.epsilon, "delta": args.delta, "sites": rows}))
        return 0
    table = Table(title=f"site budget ε = {args.epsilon:g}, δ = {args.delta:g}")
    columns = (
        ("site", "site"),
        ("records", "records"),
        ("q", "sampling_rate"),
        ("steps", "total_steps"),
        ("train z", "training_noise_multiplier"),
        ("train ε", "training_epsilon"),
        ("release z", "release_noise_multiplier"),
        ("release ε", "release_epsilon"),
        ("total ε", "epsilon_total"),
    )
    for title, _ in columns:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(*(_cell(row[key]) for _, key in columns))
    console.print(table)
    console.print(
        "train z: noise std / clip bound of each DP-SGD step; release z: noise std / "
        "sensitivity of each release. The ε of a part is that part alone; total ε is the "
        "whole run composed (PLD) as the site ledger will compose it, which is less than "
        "the sum."
    )
    return 0


def _plan_row(index: int, plan: Any) -> dict[str, Any]:
    return {
        "site": index,
        "records": plan.request.records,
        "sampling_rate": plan.sampling_rate,
        "steps_per_round": plan.steps_per_round,
        "total_steps": plan.total_steps,
        "training_noise_multiplier": plan.training_noise_multiplier,
        "training_epsilon": plan.training_epsilon,
        "releases": plan.request.releases,
        "release_noise_multiplier": plan.release_noise_multiplier,
        "release_epsilon": plan.release_epsilon,
        "epsilon_total": plan.epsilon_total,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def _cmd_client_budget(args: argparse.Namespace, _settings: object) -> int:
    from client.ledger_store import LedgerStore

    path = Path(args.ledger) if args.ledger else Path(args.state_dir) / "ledger.sqlite"
    store = LedgerStore(path)
    ledger = store.read()
    history = store.history()
    summary = {
        "ledger": str(path),
        "budget_epsilon": ledger.budget_epsilon,
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "epsilon_spent": ledger.epsilon_spent(),
        "remaining": ledger.remaining(),
        "events": history,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    table = Table(title=f"privacy ledger {path}")
    for col in ("#", "when (UTC)", "kind", "label", "z", "q", "steps", "ε after"):
        table.add_column(col, justify="right" if col not in ("kind", "label") else "left")
    for row in history:
        table.add_row(
            str(row["id"]),
            str(row["created_at"])[:19],
            str(row["kind"]),
            str(row["label"]),
            _cell(row["noise_multiplier"]),
            _cell(row["sampling_rate"]),
            str(row["steps"]),
            _cell(row["epsilon_after"]),
        )
    console.print(table)
    console.print(
        f"budget ε = {ledger.budget_epsilon:g} at δ = {ledger.delta:g}; spent ε = "
        f"{ledger.epsilon_spent():.4g} ({ledger.accountant.upper()} accounting of all "
        f"{len(history)} events composed); left ≈ {ledger.remaining():.4g}"
    )
    return 0


def _cmd_client_review(args: argparse.Namespace, _settings: object) -> int:
    from client.review import review_site

    review = review_site(Path(args.state_dir), top=args.top)
    if args.json:
        print(
            json.dumps(
                {
                    "site": review.site,
                    "method": review.method,
                    "curvature": review.curvature,
                    "records": review.records,
                    "ranked": [
                        {
                            "rank": i + 1,
                            "position": r.position,
                            "label": r.label,
                            "self_influence": r.self_influence,
                            "loss": r.loss,
                            "record": row,
                        }
                        for i, (r, row) in enumerate(zip(review.ranked, review.rows, strict=True))
                    ],
                },
                indent=2,
                default=str,
            )
        )
        return 0
    source = (
        "the federation's released factors"
        if review.curvature == "released"
        else "this site's own records"
    )
    table = Table(
        title=f"{review.site}: {len(review.ranked)} of {review.records} records by "
        f"self-influence ({review.method}, curvature from {source})"
    )
    columns = [k for k in (review.rows[0] if review.rows else {}) if k != "row"][:6]
    for col in ("rank", "row", "label", "self-influence", "loss", *columns):
        table.add_column(col, justify="right" if col not in columns else "left")
    for i, (r, row) in enumerate(zip(review.ranked, review.rows, strict=True)):
        table.add_row(
            str(i + 1),
            str(row["row"]),
            str(r.label),
            f"{r.self_influence:.4g}",
            f"{r.loss:.3g}",
            *(str(row[c]) for c in columns),
        )
    console.print(table)
    console.print(
        "Records at the top shape their own predictions most: check their labels first. "
        "This list stays on this machine."
    )
    return 0
