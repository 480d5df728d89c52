"""``fedlens admin token``: issue, list and revoke the tokens analysts and the coordinator
present (:mod:`server.access`), working on the coordinator's database directly."""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from fedlens.errors import ConfigurationError
from fedlens.settings import Settings

__all__ = ["add_admin_commands"]

console = Console()

_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def parse_lifetime(text: str) -> timedelta:
    """``90d``, ``12h`` or ``30m`` as a duration.

    Raises
    ------
    ConfigurationError
        Not a positive whole number followed by ``m``, ``h`` or ``d``.
    """
    match = re.fullmatch(r"\s*(\d{1,6})\s*([mhd])\s*", text)
    if match is None or int(match.group(1)) == 0:
        raise ConfigurationError(
            f"--expires-in must be a positive whole number of minutes, hours or days "
            f"such as 30m, 12h or 90d, got {text!r}"
        )
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


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
    issue.add_argument(
        "--expires-in",
        default="",
        metavar="DURATION",
        help="refuse the token after this long, e.g. 90d, 12h, 30m (default: until revoked)",
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

    now = datetime.now(UTC)
    expires_at = now + parse_lifetime(args.expires_in) if args.expires_in else None
    principal, token = _access(args, settings).issue(
        args.name, Role.parse(args.role), now=now, expires_at=expires_at
    )
    if args.json:
        print(
            json.dumps(
                {
                    "token_id": principal.token_id,
                    "name": principal.name,
                    "role": args.role,
                    "token": token,
                    "expires": expires_at.isoformat() if expires_at else None,
                }
            )
        )
        return 0
    until = f", expires {expires_at.isoformat(timespec='seconds')}" if expires_at else ""
    console.print(f"token {principal.token_id} for {principal.name} ({args.role}{until}):")
    print(token)
    console.print("It is shown only now; the coordinator keeps its hash. Use it as FEDLENS_TOKEN.")
    return 0


def _cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = _access(args, settings).tokens()
    now = datetime.now(UTC)

    def when(at: datetime | None) -> str | None:
        return at.isoformat(timespec="seconds") if at is not None else None

    if args.json:
        print(
            json.dumps(
                [
                    {
                        "token_id": r.principal.token_id,
                        "name": r.principal.name,
                        "role": r.principal.role.name.lower(),
                        "issued": when(r.issued_at),
                        "revoked": when(r.revoked_at),
                        "expires": when(r.expires_at),
                        "active": r.active(now),
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title="tokens")
    for col in ("id", "name", "role", "issued (UTC)", "revoked (UTC)", "expires (UTC)"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.principal.token_id,
            r.principal.name,
            r.principal.role.name.lower(),
            str(when(r.issued_at))[:19],
            (when(r.revoked_at) or "")[:19],
            (when(r.expires_at) or "never")[:19]
            + (" (expired)" if r.expires_at is not None and r.expires_at <= now else ""),
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
