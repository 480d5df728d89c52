"""The ``fedlens`` command.

::

    fedlens demo                    train and explain on embedded data, end to end
    fedlens server                  run the coordinator's gRPC services (--dashboard: web pages)
    fedlens query releases          list releases (through the Query service)
    fedlens query show ID           one release, its top features and privacy costs
    fedlens query budgets           every site's budget, spend and reserved ε, as mirrored
    fedlens query submit KIND       ask for an explanation round; query job ID, query jobs
    fedlens query explain, fedlens explain --input FILE
                                    explain one input (a JSON object of raw feature values)
    fedlens report --out FILE       releases and budgets as one self-contained HTML page
    fedlens plan                    split a site budget between training and releases
    fedlens client budget           a site's ledger: budget, spend history, what is left
    fedlens client review           a site's own records ranked by self-influence (stays local)
    fedlens keys identity|tls|enroll  site identity key, test certificates, enrolment
    fedlens admin token issue|list|revoke|allowance  tokens bound to roles, ε allowances

Only this module configures logging, and it imports the ``server`` and ``client``
layers lazily, inside the commands that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from fedlens.cli_admin import add_admin_commands
from fedlens.cli_jobs import add_job_commands
from fedlens.cli_keys import add_key_commands
from fedlens.cli_privacy import add_privacy_commands
from fedlens.cli_report import add_report_commands
from fedlens.errors import ConfigurationError, FedlensError
from fedlens.runconfig import validation_message
from fedlens.settings import Settings
from fedlens.types import Release

__all__ = ["main"]

console = Console()
err_console = Console(stderr=True)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


def _cmd_server(args: argparse.Namespace, settings: Settings) -> int:
    from server.access import AccessControl, Role
    from server.aggregation import Aggregator, QueryHandler
    from server.grpc_server import serve
    from server.identities import IdentityRegistry
    from server.jobs import JobQueue
    from server.storage import Store

    tls_cert = args.tls_cert or settings.tls_cert
    tls_key = args.tls_key or settings.tls_key
    if (tls_cert is None) != (tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    store = Store(args.database_url or settings.database_url)
    enrolment = args.enrolment or settings.enrolment
    auth = args.auth or settings.auth
    aggregator = Aggregator(store, identities=IdentityRegistry(store), enrolment=enrolment)
    access = AccessControl(store) if auth == "token" else None
    if access is not None and settings.admin_token is not None:
        access.provision(
            "admin (FEDLENS_ADMIN_TOKEN)",
            Role.ADMIN,
            settings.admin_token.get_secret_value(),
            now=datetime.now(UTC),
        )
    launcher = _flower_launcher(args) if args.flower_connection else None
    query = QueryHandler(store)
    jobs = JobQueue(aggregator)
    running = serve(
        aggregator,
        query,
        address=args.address,
        tls_cert=tls_cert,
        tls_key=tls_key,
        access=access,
        jobs=jobs,
    )
    dashboard_address = args.dashboard or settings.dashboard
    dashboard = None
    if dashboard_address:
        from server.dashboard import start_dashboard

        try:
            dashboard = start_dashboard(query, jobs, access, address=dashboard_address)
        except ConfigurationError:
            running.stop()
            raise
    runner = None
    if launcher is not None:
        runner = _job_runner(launcher, jobs, args.job_aggregator or running.address)
    console.print(
        f"fedlens server on port {running.port} ({'TLS' if running.tls else 'plaintext'}), "
        f"store {store.url}, {enrolment} enrolment, "
        f"{'tokens required' if auth == 'token' else 'NO access control'} (Ctrl-C stops)"
    )
    if dashboard is not None:
        console.print(f"dashboard on {dashboard.url}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    if runner is not None:
        runner.stop(timeout_s=5)
    if dashboard is not None:
        dashboard.stop()
    running.stop()
    store.close()
    return 0


def _flower_launcher(args: argparse.Namespace) -> Any:
    """``flwr run`` of the fedlens app on the SuperLink ``--flower-connection`` (checked
    before the server binds its port)."""
    from importlib import resources

    from server.job_runner import FlowerLauncher

    app = args.flower_app or Path(str(resources.files("server") / "flower_project"))
    return FlowerLauncher(app, args.flower_connection)


def _job_runner(launcher: Any, jobs: Any, address: str) -> Any:
    """Run queued jobs one at a time through ``launcher``, in a thread of this process."""
    from server.job_runner import JobRunner

    runner = JobRunner(jobs, launcher, deployment={"aggregator": address})
    runner.start()
    console.print(
        f"running queued jobs through Flower ({launcher.connection}, app {launcher.app_dir})"
    )
    return runner


def _release_table(release: Release, top: int) -> Table:
    table = Table(title=f"release {release.release_id} ({release.kind})")
    table.add_column("feature")
    table.add_column("released value", justify="right")
    table.add_column("noise std", justify="right")
    for v in release.grouped[:top] or release.values[:top]:
        table.add_row(v.name, f"{v.value:+.4f}", f"{v.noise_std:.4f}")
    return table


def _cost_table(release: Release) -> Table:
    table = Table(title="privacy cost per site")
    for col in ("site", "ε (this release)", "δ", "ε (site total)"):
        table.add_column(col, justify="right")
    for c in release.costs:
        table.add_row(c.site_id, f"{c.epsilon:.3f}", f"{c.delta:.1e}", f"{c.epsilon_total:.3f}")
    return table


def _token(args: argparse.Namespace, settings: Settings) -> str | None:
    if args.token:
        return str(args.token)
    return settings.token_value


def _cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    from fedlens.query_client import QueryClient

    with QueryClient(
        args.address or settings.aggregator_address,
        tls_ca=args.tls_ca or settings.tls_ca,
        token=_token(args, settings),
    ) as client:
        if args.query_command == "budgets":
            ledgers = client.list_budgets(site_id=args.site)
            if args.json:
                print(json.dumps([ledger.to_dict() for ledger in ledgers], indent=2))
                return 0
            table = Table(title="site budgets (mirrored ledgers)")
            for col in ("site", "budget ε", "δ", "spent ε", "reserved ε", "events", "accountant"):
                table.add_column(col, justify="left" if col == "site" else "right")
            for ledger in ledgers:
                table.add_row(
                    ledger.site_id,
                    f"{ledger.budget_epsilon:g}",
                    f"{ledger.delta:.1e}",
                    f"{ledger.epsilon_spent:.3f}",
                    f"{ledger.reserved_epsilon:.3f}",
                    str(len(ledger.events)),
                    ledger.accountant.upper(),
                )
            console.print(table)
            return 0
        if args.query_command == "releases":
            summaries = client.list_releases(limit=args.limit, kind=args.kind)
            if args.json:
                print(json.dumps([asdict(s) for s in summaries], indent=2))
                return 0
            table = Table(title="releases")
            table.add_column("release", no_wrap=True, min_width=32)
            table.add_column("kind")
            table.add_column("created")
            table.add_column("sites", justify="right")
            for s in summaries:
                table.add_row(s.release_id, s.kind, s.created_at[:16], str(s.num_sites))
            console.print(table)
            return 0
        release = client.get_release(args.release_id)
        if args.json:
            print(json.dumps(asdict(release), indent=2))
            return 0
        console.print(_release_table(release, args.top))
        console.print(f"averaged over a noised count of {release.noised_count:.1f} records")
        console.print(_cost_table(release))
        from explain.cards import release_card

        console.print(release_card(release))
        return 0


def _read_record(path: str) -> dict[str, str]:
    """A JSON object of raw feature values, as text for the wire (numbers in decimal)."""
    try:
        with (
            open(path, encoding="utf-8")
            if path != "-"
            else contextlib.nullcontext(sys.stdin) as handle
        ):
            data = json.load(handle)
    except OSError as exc:
        raise ConfigurationError(f"cannot read --input {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"--input {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"--input {path} must hold a JSON object of feature values, got {type(data).__name__}"
        )
    record: dict[str, str] = {}
    for name, value in data.items():
        if isinstance(value, str):
            record[name] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            record[name] = json.dumps(value)
        else:
            raise ConfigurationError(
                f"feature {name!r}: expected a number or a category name, got {value!r}"
            )
    return record


def _cmd_explain(args: argparse.Namespace, settings: Settings) -> int:
    from fedlens.query_client import QueryClient

    record = _read_record(args.input)
    with QueryClient(
        args.address or settings.aggregator_address,
        tls_ca=args.tls_ca or settings.tls_ca,
        token=_token(args, settings),
    ) as client:
        result = client.explain_input(record, model_id=args.model_id, top=args.top)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return 0
    console.print(result.card)
    table = Table(title=f"attributions (relative to the {result.baseline} baseline)")
    table.add_column("feature")
    table.add_column("value")
    table.add_column("attribution", justify="right")
    for a in result.attributions:
        table.add_row(a.feature, a.value, f"{a.attribution:+.4f}")
    console.print(table)
    if result.changes:
        changes = Table(title=f"counterfactual: {result.counterfactual_label}")
        for col in ("feature", "from", "to"):
            changes.add_column(col)
        for c in result.changes:
            changes.add_row(c.feature, c.original, c.proposed)
        console.print(changes)
    elif result.counterfactual_note:
        console.print(result.counterfactual_note)
    console.print(f"model {result.model_id}; method {result.method}; no privacy spent")
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from server.demo import DemoOptions, run_demo

    options = DemoOptions(
        dataset=args.dataset,
        sites=args.sites,
        rounds=args.rounds,
        epsilon=args.epsilon,
        model=args.model,
        workdir=args.workdir,
        seed=args.seed,
    )
    report = run_demo(options, console=console)
    console.print(_release_table(report.release, top=8))
    console.print(_cost_table(report.release))
    console.print(f"test accuracy of the global model: {report.accuracy:.3f}")
    console.print(f"finished in {report.seconds:.0f} s; site logs in {report.run_dir / 'logs'}")
    console.print(f"release {report.release.release_id} stored in {report.database_url}")
    console.print(
        "read it back: fedlens server --database-url "
        f"{report.database_url} & fedlens query releases"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlens", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a federation on embedded data, end to end")
    demo.add_argument(
        "--dataset", default="adult", help="adult, breast_cancer, synthetic_hospitals"
    )
    demo.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    demo.add_argument("--rounds", type=int, default=3, help="training rounds (default 3)")
    demo.add_argument("--epsilon", type=float, default=4.0, help="privacy budget ε per site")
    demo.add_argument("--model", default="logistic", choices=("logistic", "mlp"))
    demo.add_argument("--workdir", default="fedlens-demo", help="where state and the store go")
    demo.add_argument("--seed", type=int, default=0, help="data split and initial weights")
    demo.set_defaults(func=_cmd_demo)

    server = sub.add_parser("server", help="run the coordinator's gRPC services")
    server.add_argument("--address", default="127.0.0.1:50151", help="host:port to bind")
    server.add_argument("--database-url", default="", help="SQLAlchemy URL of the store")
    server.add_argument(
        "--tls-cert", type=Path, help="PEM certificate chain for TLS (default: FEDLENS_TLS_CERT)"
    )
    server.add_argument(
        "--tls-key", type=Path, help="PEM private key of --tls-cert (default: FEDLENS_TLS_KEY)"
    )
    server.add_argument(
        "--enrolment",
        choices=("first-use", "strict"),
        default="",
        help="admit site identities on first use, or only enrolled ones "
        "(default: FEDLENS_ENROLMENT, else first-use)",
    )
    server.add_argument(
        "--auth",
        choices=("token", "off"),
        default="",
        help="require a token for analyst and coordinator calls, or leave every call open "
        "(default: FEDLENS_AUTH, else token)",
    )
    server.add_argument(
        "--flower-connection",
        default="",
        help="run analysts' jobs on this SuperLink connection (from $FLWR_HOME/config.toml); "
        "without it jobs stay queued",
    )
    server.add_argument(
        "--flower-app", type=Path, help="the fedlens Flower app directory (default: packaged)"
    )
    server.add_argument(
        "--job-aggregator",
        default="",
        help="this server's host:port as the ServerApp reaches it (default: the bound address)",
    )
    server.add_argument(
        "--dashboard",
        default="",
        metavar="HOST:PORT",
        help="also serve the web dashboard on this address, e.g. 127.0.0.1:8151 "
        "(default: FEDLENS_DASHBOARD, else none)",
    )
    server.set_defaults(func=_cmd_server)

    query = sub.add_parser("query", help="read releases through the Query service")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address", default="", help="coordinator host:port (default: FEDLENS_AGGREGATOR_ADDRESS)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument(
        "--tls-ca", type=Path, help="CA certificate of the server's TLS (default: FEDLENS_TLS_CA)"
    )
    common.add_argument(
        "--token", default="", help="your token (default: FEDLENS_TOKEN); see fedlens admin token"
    )
    qsub = query.add_subparsers(dest="query_command", required=True)
    releases = qsub.add_parser("releases", parents=[common], help="list releases, newest first")
    releases.add_argument("--limit", type=int, default=50)
    releases.add_argument("--kind", default="")
    show = qsub.add_parser("show", parents=[common], help="show one release")
    show.add_argument("release_id")
    show.add_argument("--top", type=int, default=10, help="features to show")
    budgets = qsub.add_parser(
        "budgets", parents=[common], help="every site's budget and spend, as mirrored"
    )
    budgets.add_argument("--site", default="", help="only this site")
    query.set_defaults(func=_cmd_query)
    add_job_commands(qsub, common)
    add_report_commands(sub)

    # ExplainInput, as `fedlens explain` and, beside the other Query calls, `fedlens query explain`
    for parent in (sub, qsub):
        explain = parent.add_parser(
            "explain", parents=[common], help="explain one input with the global model"
        )
        explain.add_argument(
            "--input",
            required=True,
            help="JSON file with an object of raw feature values (- reads stdin)",
        )
        explain.add_argument("--model-id", default="", help="a stored model (default: the latest)")
        explain.add_argument("--top", type=int, default=0, help="attributions to show (0: all)")
        explain.set_defaults(func=_cmd_explain)
    add_privacy_commands(sub)
    add_key_commands(sub)
    add_admin_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        settings = Settings()
        code: int = args.func(args, settings)
        return code
    except ValidationError as exc:
        err_console.print(f"[red]error:[/red] {validation_message('setting', exc)}")
        return 2
    except FedlensError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
