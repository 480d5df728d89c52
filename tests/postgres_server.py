"""A throwaway PostgreSQL server for the storage tests, installed if the machine lacks one.

The test session starts one (the ``postgres`` fixture in ``tests/conftest.py``); by hand::

    .venv/bin/python -m tests.postgres_server start /tmp/fedlens-pg   # prints the URL
    .venv/bin/python -m tests.postgres_server stop /tmp/fedlens-pg

Without ``initdb`` and ``pg_ctl`` (on the ``PATH`` or under Debian's
``/usr/lib/postgresql/<version>/bin``) it runs ``apt-get install -y postgresql``
(:mod:`tests.apt`: as root, or through ``sudo -n``). PostgreSQL refuses to run as root, so a root
process runs the server as the ``postgres`` system user the Debian package creates. The
cluster lives in the given directory and listens only on a Unix socket there, so it needs
no free port and nobody else can reach it; it trades durability for speed (``fsync=off``),
which a throwaway cluster can afford.

Every step is idempotent: ``start`` on a directory that holds a running cluster prints its
URL again, on a stopped one starts it, and on an empty one creates it; ``stop`` on a stopped
cluster does nothing. A test session's cluster (:func:`session_directory`) records the
session's process id, so a later session stops and removes it if that process died without
stopping it. With ``FEDLENS_TEST_POSTGRES_URL`` set (a server URL whose user may
create databases) the tests use that server instead and start none.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.apt import AptError, apt_install

__all__ = [
    "ENV_URL",
    "PostgresDatabases",
    "PostgresError",
    "PostgresServer",
    "find_binaries",
    "session_directory",
    "stop_abandoned",
]

ENV_URL = "FEDLENS_TEST_POSTGRES_URL"
PORT = 5432  # names the socket file in the cluster's own directory; no TCP port is opened
SYSTEM_USER = "postgres"
SESSION_PREFIX = "fedlens-pg-"
_OWNER = "owner.pid"  # the test session's process id, in its cluster's directory
_DEBIAN_BINARIES = Path("/usr/lib/postgresql")
_SETTINGS = """
# fedlens test cluster: Unix socket only, no durability (the cluster is thrown away)
listen_addresses = ''
port = {port}
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
"""


class PostgresError(RuntimeError):
    """PostgreSQL could not be installed, initialised, started or reached."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_binaries() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, newest version first."""
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(_DEBIAN_BINARIES.glob("*/bin"), key=_version_key, reverse=True)
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def install() -> Path:
    """Install PostgreSQL with apt-get (Debian, Ubuntu); returns its binaries' directory."""
    try:
        apt_install(
            ["postgresql"],
            what="PostgreSQL (initdb, pg_ctl)",
            otherwise=f"install PostgreSQL, or point {ENV_URL} at a server",
        )
    except AptError as exc:
        raise PostgresError(str(exc)) from None
    found = find_binaries()
    if found is None:
        raise PostgresError(
            f"apt-get installed postgresql but no pg_ctl is under {_DEBIAN_BINARIES}"
        )
    return found


def _run(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    user: str | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    extra: dict[str, object] = {}
    if user is not None:
        extra = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
    try:
        done = subprocess.run(
            list(argv),
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **extra,  # type: ignore[arg-type]
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostgresError(f"{' '.join(argv)} failed: {exc}") from exc
    if check and done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-3000:]
        raise PostgresError(f"{' '.join(argv)} exited with {done.returncode}:\n{output}")
    return done


class PostgresServer:
    """A PostgreSQL cluster in ``directory``, reached through a Unix socket there.

    Parameters
    ----------
    directory
        Holds the cluster (``data/``), its log (``server.log``) and its socket. Created if
        missing; when this process is root it is handed to the ``postgres`` user.
    binaries
        Where ``initdb`` and ``pg_ctl`` are; found, or installed, if not given.
    """

    def __init__(self, directory: Path, binaries: Path | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.binaries = binaries or find_binaries() or install()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PostgresError(
                    f"running as root, PostgreSQL needs an unprivileged user {SYSTEM_USER!r} "
                    "(the Debian package creates it)"
                ) from None
            self.user = SYSTEM_USER

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        host = quote(str(self.directory), safe="")
        return f"postgresql+psycopg://postgres@/{database}?host={host}&port={PORT}"

    def _tool(self, name: str, *args: str, timeout: float = 120, check: bool = True) -> int:
        done = _run(
            [str(self.binaries / name), *args],
            user=self.user,
            cwd=self.directory,
            timeout=timeout,
            check=check,
        )
        return done.returncode

    def running(self) -> bool:
        # pg_ctl status: 0 running, 3 not running, 4 no data directory
        return (
            self.data.is_dir()
            and self._tool("pg_ctl", "status", "-D", str(self.data), check=False) == 0
        )

    def start(self) -> None:
        """Create the cluster if there is none and start it if it is not running."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        if not (self.data / "PG_VERSION").is_file():
            self._tool(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            )
            settings = _SETTINGS.format(port=PORT, socket_dir=self.directory)
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(settings)
        if self.running():
            return
        try:
            self._tool(
                "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60"
            )
        except PostgresError as exc:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise PostgresError(f"{exc}\nserver log {self.log}:\n{tail}") from None

    def stop(self) -> None:
        """Stop the server (fast shutdown) if it is running."""
        if self.running():
            self._tool("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")


def session_directory() -> Path:
    """A new directory for a test session's cluster, marked with this process's id.

    Not under pytest's ``tmp_path``: when the tests run as root the server runs as the
    ``postgres`` user, who must be able to reach the directory.
    """
    directory = Path(tempfile.mkdtemp(prefix=SESSION_PREFIX))
    (directory / _OWNER).write_text(str(os.getpid()))
    return directory


def stop_abandoned(binaries: Path) -> list[Path]:
    """Stop and remove the clusters of test sessions whose process has died; returns them."""
    stopped = []
    for directory in Path(tempfile.gettempdir()).glob(f"{SESSION_PREFIX}*"):
        try:
            owner = int((directory / _OWNER).read_text())
        except (OSError, ValueError):
            continue  # not a session's cluster, or not ours to judge
        if _alive(owner):
            continue
        PostgresServer(directory, binaries).stop()
        shutil.rmtree(directory, ignore_errors=True)
        stopped.append(directory)
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PostgresDatabases:
    """Creates and drops databases on a server, given a URL whose user may create them."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self._engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")

    def create(self, name: str = "") -> str:
        """Create a database (a fresh name if none is given); returns its URL."""
        name = name or f"fedlens_test_{uuid.uuid4().hex[:16]}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
            raise PostgresError(f"database name {name!r}: letters, digits and '_' only")
        try:
            with self._engine.connect() as connection:
                exists = connection.execute(
                    text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
                ).first()
                if exists is None:
                    connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        except Exception as exc:
            raise PostgresError(
                f"cannot create database {name!r} at {self.admin_url}: {exc}"
            ) from exc
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        """Drop the database of ``url``, closing any connection left open to it."""
        name = make_url(url).database
        with self._engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self._engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.postgres_server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--database", default="fedlens", help="created by start if missing")
    args = parser.parse_args(argv)
    try:
        if args.action == "stop":
            binaries = find_binaries()
            if binaries is not None:  # nothing installed, nothing running
                PostgresServer(args.directory, binaries).stop()
            return 0
        server = PostgresServer(args.directory)
        server.start()
        databases = PostgresDatabases(server.url())
        try:
            print(databases.create(args.database))
        finally:
            databases.close()
    except PostgresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
