"""Fixtures shared by every test package: the store's database on SQLite or PostgreSQL.

A test that takes ``database_url`` gets a fresh SQLite file. Marked ``both_backends``, it
runs twice: on SQLite and on a fresh database of a real PostgreSQL server, which the session
installs if needed, starts once and stops at its end (:mod:`tests.postgres_server`). If
PostgreSQL cannot be installed or started those runs fail; they are never skipped. Leave
them out explicitly with ``-m 'not slow and not postgresql'``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres_server import (
    ENV_URL,
    PostgresDatabases,
    PostgresServer,
    session_directory,
    stop_abandoned,
)

BACKENDS = (
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_backends"
    ):
        metafunc.parametrize("database_url", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases]:
    """A PostgreSQL server for the session: ``FEDLENS_TEST_POSTGRES_URL``, or one started here."""
    external = os.environ.get(ENV_URL)
    if external:
        databases = PostgresDatabases(external)
        yield databases
        databases.close()
        return
    directory = session_directory()
    try:
        server = PostgresServer(directory)
        stop_abandoned(server.binaries)
        server.start()
        try:
            databases = PostgresDatabases(server.url())
            yield databases
            databases.close()
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A SQLAlchemy URL of an empty database: SQLite, or PostgreSQL (see the module doc)."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'fedlens.db'}"
        return
    databases: PostgresDatabases = request.getfixturevalue("postgres")
    url = databases.create()
    yield url
    databases.drop(url)
