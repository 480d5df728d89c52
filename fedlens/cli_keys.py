"""The key commands of ``fedlens``: site identities, a test PKI, enrolment.

::

    fedlens keys identity --site-id ID --out DIR     a site's Ed25519 identity key pair
    fedlens keys tls --out DIR --host H [--host H]   a test CA and a server certificate
    fedlens keys enroll --site-id ID --public-key FILE_OR_HEX [--replace]
                                                     register a site's key at the coordinator

``identity`` runs at the site, ``tls`` and ``enroll`` at the coordinator. Private keys are
written with mode 0600 and never printed.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlens.errors import ConfigurationError
from fedlens.settings import Settings

__all__ = ["add_key_commands"]

console = Console()

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def add_key_commands(sub: Any) -> None:
    """Register ``keys identity``, ``keys tls`` and ``keys enroll`` on the top-level subparsers."""
    keys = sub.add_parser("keys", help="site identity keys, TLS certificates, enrolment")
    ksub = keys.add_subparsers(dest="keys_command", required=True)

    identity = ksub.add_parser(
        "identity",
        help="create a site's Ed25519 identity key pair",
        description="Write <site-id>.key (private, mode 0600, stays at the site) and "
        "<site-id>.pub (the public key in hex, for the coordinator's administrator to "
        "enrol). Existing files are never overwritten.",
    )
    identity.add_argument("--site-id", required=True, help="the site's id, as in its node config")
    identity.add_argument("--out", required=True, type=Path, help="directory to write to")
    identity.set_defaults(func=_cmd_identity)

    tls = ksub.add_parser(
        "tls",
        help="create a test CA and a server certificate (test deployments only)",
        description="Write ca.pem and ca.key (a self-signed CA) and server.pem and server.key "
        "(a certificate it signs, naming every --host). For test deployments; in production "
        "use certificates from the operator's PKI. Existing files are never overwritten.",
    )
    tls.add_argument("--out", required=True, type=Path, help="directory to write to")
    tls.add_argument(
        "--host",
        action="append",
        help="a DNS name or IP address clients dial (repeat; default: localhost and 127.0.0.1)",
    )
    tls.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    tls.set_defaults(func=_cmd_tls)

    enroll = ksub.add_parser(
        "enroll",
        help="register a site's public identity key in the coordinator's registry",
        description="Enrol a site's public identity key (its .pub file, or the 64 hex digits) "
        "in the coordinator's database. A different key for an enrolled site is refused "
        "unless --replace is given. Every enrolment and refusal is audited.",
    )
    enroll.add_argument("--site-id", required=True, help="the site's id")
    enroll.add_argument(
        "--public-key", required=True, help="the site's .pub file, or its 64 hex digits"
    )
    enroll.add_argument(
        "--replace", action="store_true", help="replace the key of an enrolled site"
    )
    enroll.add_argument(
        "--database-url", default="", help="the coordinator's store (default: FEDLENS_DATABASE_URL)"
    )
    enroll.set_defaults(func=_cmd_enroll)


def _cmd_identity(args: argparse.Namespace, _settings: Settings) -> int:
    from fedlens.identity import create_identity

    files = create_identity(args.out, args.site_id)
    console.print(f"private key  {files.private_key}  (mode 0600; keep it at the site)")
    console.print(f"public key   {files.public_key_file}  {files.fingerprint}")
    console.print(
        f"give {files.public_key_file.name} to the coordinator's administrator, who runs:"
    )
    console.print(
        f"  fedlens keys enroll --site-id {files.site_id} --public-key {files.public_key_file.name}"
    )
    return 0


def _cmd_tls(args: argparse.Namespace, _settings: Settings) -> int:
    from fedlens.identity import create_test_pki

    hosts = args.host or list(DEFAULT_HOSTS)
    files = create_test_pki(args.out, hosts, now=datetime.now(UTC), days=args.days)
    console.print(f"test CA      {files.ca_cert} (give it to clients: --tls-ca)")
    console.print(f"server cert  {files.server_cert} for {', '.join(hosts)}, {args.days} days")
    console.print(f"server key   {files.server_key} (mode 0600)")
    console.print(f"  fedlens server --tls-cert {files.server_cert} --tls-key {files.server_key}")
    console.print("for test deployments only: production uses the operator's PKI")
    return 0


def _cmd_enroll(args: argparse.Namespace, settings: Settings) -> int:
    from fedlens.identity import load_identity_public
    from server.identities import IdentityRegistry
    from server.storage import Store

    store = Store(args.database_url or settings.database_url)
    try:
        registry = IdentityRegistry(store)
        now = datetime.now(UTC)
        try:
            public_key = load_identity_public(args.public_key)
        except ConfigurationError as exc:
            registry.record_refusal(args.site_id, str(exc), now=now)
            raise
        enrolment = registry.enroll(args.site_id, public_key, now=now, replace=args.replace)
    finally:
        store.close()
    console.print(
        f"site {enrolment.site_id}: {enrolment.outcome} ({enrolment.fingerprint}) in {store.url}"
    )
    return 0
