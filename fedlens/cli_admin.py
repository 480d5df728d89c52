"""``fedlens admin token``: issue, list and revoke the tokens analysts and the coordinator
present (:mod:`server.access`), working on the coordinator's database directly."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from fedlens.settings import Settings

__all__ = ["add_admin_commands"]

console = Console()


def add_admin_commands(sub: Any) -> None:
    admin = sub.add_parser("admin", help="administer the coordinator: tokens and roles")
    asub = admin.add_subparsers(dest="admin_command", required=True)
    token = asub.add_parser("token", help="tokens bound to roles (admin, analyst, viewer)")
    tsub = token.add_subparsers(dest="token_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url", default="", help="the coordinator's store (default: FEDLENS_DATABASE_URL)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    issue = tsub.add_parser("issue", parents=[common], help="issue a token (shown once)")
    issue.add_argument("--name", required=True, help="who holds it (a person or a service)")
    issue.add_argument(
        "--role", required=True, choices=("admin", "analyst", "viewer"), help="what it may do"
    )
    issue.set_defaults(func=_cmd_issue)
    listing = tsub.add_parser("list", parents=[common], help="every token, never its secret")
    listing.set_defaults(func=_cmd_list)
    allowance = tsub.add_parser(
        "allowance",
        parents=[common],
        help="cap the ε a token's jobs may spend in all, on top of the sites' budgets",
    )
    allowance.add_argument("token_id")
    cap = allowance.add_mutually_exclusive_group(required=True)
    cap.add_argument("--epsilon", type=float, help="the cap, summed over the token's jobs")
    cap.add_argument("--none", action="store_true", help="remove the cap")
    allowance.set_defaults(func=_cmd_allowance)
    revoke = tsub.add_parser("revoke", parents=[common], help="revoke a token by its id")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=_cmd_revoke)


def _access(args: argparse.Namespace, settings: Settings) -> Any:
    from server.access import AccessControl
    from server.storage import Store

    return AccessControl(Store(args.database_url or settings.database_url))


def _cmd_issue(args: argparse.Namespace, settings: Settings) -> int:
    from server.access import Role

    principal, token = _access(args, settings).issue(
        args.name, Role.parse(args.role), now=datetime.now(UTC)
    )
    if args.json:
        print(
            json.dumps(
                {
                    "token_id": principal.token_id,
                    "name": principal.name,
                    "role": args.role,
                    "token": token,
                }
            )
        )
        return 0
    console.print(f"token {principal.token_id} for {principal.name} ({args.role}):")
    print(token)
    console.print("It is shown only now; the coordinator keeps its hash. Use it as FEDLENS_TOKEN.")
    return 0


def _cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = _access(args, settings).tokens()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "token_id": p.token_id,
                        "name": p.name,
                        "role": p.role.name.lower(),
                        "issued": issued.isoformat(),
                        "revoked": revoked.isoformat() if revoked else None,
                    }
                    for p, issued, revoked in rows
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title="tokens")
    for col in ("id", "name", "role", "issued (UTC)", "revoked (UTC)"):
        table.add_column(col)
    for p, issued, revoked in rows:
        table.add_row(
            p.token_id,
            p.name,
            p.role.name.lower(),
            str(issued)[:19],
            str(revoked)[:19] if revoked else "",
        )
    console.print(table)
    return 0


def _cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    principal = _access(args, settings).revoke(args.token_id, now=datetime.now(UTC))
    console.print(f"token {principal.token_id} of {principal.name} revoked")
    return 0


def _cmd_allowance(args: argparse.Namespace, settings: Settings) -> int:
    epsilon = None if args.none else float(args.epsilon)
    _access(args, settings).set_allowance(args.token_id, epsilon, now=datetime.now(UTC))
    cap = "no cap" if epsilon is None else f"ε = {epsilon:g} in all"
    console.print(f"token {args.token_id}: jobs may spend {cap}")
    return 0
