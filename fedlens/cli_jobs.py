"""``fedlens query submit|job|jobs``: ask the coordinator an explanation question and
follow the job that answers it (through the Query service)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from fedlens.errors import ConfigurationError
from fedlens.jobs import Job, JobRequest
from fedlens.settings import Settings

__all__ = ["add_job_commands"]

console = Console()


def add_job_commands(qsub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``submit``, ``job`` and ``jobs`` under ``fedlens query``."""
    submit = qsub.add_parser(
        "submit", parents=[common], help="ask for an explanation round (a job)"
    )
    submit.add_argument("kind", help="explanation kind, e.g. global_attribution, group_influence")
    submit.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-configuration key of the explanation, e.g. explain-epsilon=0.5 (repeatable)",
    )
    submit.add_argument(
        "--cohort", default="", help='global_attribution: JSON filter, e.g. \'{"sex": ["Female"]}\''
    )
    submit.add_argument(
        "--input",
        default="",
        help="influence kinds: JSON file with the query's raw feature values (- reads stdin)",
    )
    submit.add_argument(
        "--wait", action="store_true", help="poll until the job is done, refused or failed"
    )
    submit.add_argument("--timeout", type=float, default=900.0, help="seconds --wait waits")
    submit.set_defaults(func=_cmd_submit)
    job = qsub.add_parser("job", parents=[common], help="one job's state")
    job.add_argument("job_id")
    job.set_defaults(func=_cmd_job)
    jobs = qsub.add_parser("jobs", parents=[common], help="jobs, newest first")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument(
        "--state", default="", help="only jobs in this state (queued, running, done, ...)"
    )
    jobs.set_defaults(func=_cmd_jobs)


def _client(args: argparse.Namespace, settings: Settings) -> Any:
    from fedlens.query_client import QueryClient

    token = args.token or settings.token_value
    return QueryClient(
        args.address or settings.aggregator_address,
        tls_ca=args.tls_ca or settings.tls_ca,
        token=token,
    )


def _params(pairs: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"--param {pair!r}: expected KEY=VALUE")
        params[key.strip()] = value.strip()
    return params


def _read_input(path: str) -> str:
    if not path:
        return ""
    try:
        with (
            open(path, encoding="utf-8")
            if path != "-"
            else contextlib.nullcontext(sys.stdin) as handle
        ):
            text = handle.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read --input {path}: {exc.strerror}") from None
    return text.strip()


def _table(jobs: list[Job], title: str) -> Table:
    table = Table(title=title)
    table.add_column("job", no_wrap=True, min_width=32)
    for col in ("kind", "state", "release", "by", "updated", "reason"):
        table.add_column(col)
    for j in jobs:
        state = f"{j.state.value} (cached)" if j.from_cache else j.state.value
        table.add_row(
            j.job_id, j.kind, state, j.release_id, j.submitted_by, j.updated_at[:19], j.reason
        )
    return table


def _show(job: Job, as_json: bool) -> None:
    if as_json:
        print(json.dumps(asdict(job), indent=2))
        return
    table = Table(title=f"job {job.job_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    state = f"{job.state.value} (answered from an identical job)" if job.from_cache else job.state
    for name, value in (
        ("kind", job.kind),
        ("state", state),
        ("release", job.release_id or "-"),
        ("submitted by", job.submitted_by),
        ("created", job.created_at),
        ("updated", job.updated_at),
        ("reason", job.reason or "-"),
    ):
        table.add_row(name, str(value))
    console.print(table)
    if job.release_id:
        console.print(f"read it: fedlens query show {job.release_id}")


def _cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    request = JobRequest(
        kind=args.kind,
        params=_params(args.param),
        cohort=args.cohort,
        query_input=_read_input(args.input),
    )
    with _client(args, settings) as client:
        job = client.submit_job(request)
        deadline = time.monotonic() + args.timeout
        while args.wait and not job.state.finished and time.monotonic() < deadline:
            time.sleep(2.0)
            job = client.get_job(job.job_id)
    _show(job, args.json)
    return 0 if job.state.value in ("queued", "running", "done") else 1


def _cmd_job(args: argparse.Namespace, settings: Settings) -> int:
    with _client(args, settings) as client:
        _show(client.get_job(args.job_id), args.json)
    return 0


def _cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    with _client(args, settings) as client:
        jobs = client.list_jobs(limit=args.limit, state=args.state)
    if args.json:
        print(json.dumps([asdict(j) for j in jobs], indent=2))
    else:
        console.print(_table(jobs, "jobs"))
    return 0
