"""The throwaway PostgreSQL server of the storage tests: every step may be repeated."""

from __future__ import annotations

import shutil

import pytest
from sqlalchemy import create_engine, text

from tests.postgres_server import PostgresServer, main, session_directory

pytestmark = pytest.mark.postgresql


def test_start_and_stop_are_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    directory = session_directory()
    try:
        assert main(["start", str(directory)]) == 0
        url = capsys.readouterr().out.strip()
        assert main(["start", str(directory)]) == 0  # running: the same URL, nothing redone
        assert capsys.readouterr().out.strip() == url
        assert url.startswith("postgresql+psycopg://") and "/fedlens?" in url

        engine = create_engine(url)
        with engine.connect() as c:
            assert c.execute(text("SELECT current_database()")).scalar_one() == "fedlens"
        engine.dispose()
        assert PostgresServer(directory).running()

        assert main(["stop", str(directory)]) == 0
        assert not PostgresServer(directory).running()
        assert main(["stop", str(directory)]) == 0  # stopped: nothing to do
        assert main(["start", str(directory)]) == 0  # the cluster is kept and started again
        assert capsys.readouterr().out.strip() == url
    finally:
        main(["stop", str(directory)])
        shutil.rmtree(directory, ignore_errors=True)
