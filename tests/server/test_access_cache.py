"""Authenticated tokens are remembered for a bounded time: revocations through the same
AccessControl take effect at once, from anywhere else within the TTL. Times are passed in."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event

from fedlens.errors import AuthenticationError, ConfigurationError
from server.access import AccessControl, Role
from server.storage import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TTL = 5.0


class TokenReads:
    """Counts the database reads of the access_tokens table; can run a hook after one."""

    def __init__(self, store: Store) -> None:
        self.count = 0
        self.after_read: Any = None
        event.listen(store.engine, "after_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "access_tokens" in statement:
            self.count += 1
            hook, self.after_read = self.after_read, None
            if hook is not None:
                hook()


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = Store(database_url)
    yield s
    s.close()


def test_a_token_is_read_once_per_ttl(store: Store) -> None:
    access = AccessControl(store, token_ttl=TTL, clock=lambda: 0.0)
    principal, token = access.issue("ana", Role.VIEWER, now=NOW)
    reads = TokenReads(store)
    assert access.authenticate(token, now=100.0) == principal
    assert access.authenticate(token, now=100.0 + TTL - 0.001) == principal
    assert reads.count == 1
    assert access.authenticate(token, now=100.0 + TTL) == principal  # expired: read again
    assert reads.count == 2
    assert access.authenticate(token) == principal  # the clock (0.0) is within the new TTL
    assert reads.count == 2


def test_a_wrong_secret_for_a_remembered_id_is_refused(store: Store) -> None:
    access = AccessControl(store, token_ttl=TTL)
    _, token = access.issue("ana", Role.ANALYST, now=NOW)
    access.authenticate(token, now=0.0)
    with pytest.raises(AuthenticationError, match="unknown token"):
        access.authenticate(token[:-2] + ("xy" if not token.endswith("xy") else "zz"), now=0.0)
    assert access.authenticate(token, now=0.0).name == "ana"


@pytest.mark.both_backends
def test_revoking_through_the_same_access_control_takes_effect_at_once(store: Store) -> None:
    access = AccessControl(store, token_ttl=TTL)
    principal, token = access.issue("ana", Role.VIEWER, now=NOW)
    access.authenticate(token, now=0.0)
    access.revoke(principal.token_id, now=NOW)
    with pytest.raises(AuthenticationError, match="revoked"):
        access.authenticate(token, now=0.0)


@pytest.mark.both_backends
def test_revoking_from_elsewhere_takes_effect_within_the_ttl(
    store: Store, database_url: str
) -> None:
    access = AccessControl(store, token_ttl=TTL)
    principal, token = access.issue("ana", Role.VIEWER, now=NOW)
    access.authenticate(token, now=0.0)
    elsewhere = Store(database_url)  # as `fedlens admin token revoke` in another process
    try:
        AccessControl(elsewhere).revoke(principal.token_id, now=NOW)
    finally:
        elsewhere.close()
    assert access.authenticate(token, now=TTL - 0.001) == principal  # the documented bound
    with pytest.raises(AuthenticationError, match="revoked"):
        access.authenticate(token, now=TTL)
    with pytest.raises(AuthenticationError, match="revoked"):
        access.authenticate(token, now=0.0)  # a refusal is not remembered either way


def test_a_read_overtaken_by_a_revocation_is_not_remembered(store: Store) -> None:
    access = AccessControl(store, token_ttl=TTL)
    principal, token = access.issue("ana", Role.VIEWER, now=NOW)
    reads = TokenReads(store)
    # The revocation commits after authenticate has read the row but before it returns.
    reads.after_read = lambda: access.revoke(principal.token_id, now=NOW)
    assert access.authenticate(token, now=0.0) == principal  # concurrent with the revoke
    with pytest.raises(AuthenticationError, match="revoked"):
        access.authenticate(token, now=0.0)


def test_no_ttl_reads_every_time_and_the_memory_is_bounded(store: Store) -> None:
    never = AccessControl(store, token_ttl=0.0)
    _, token = never.issue("ana", Role.VIEWER, now=NOW)
    reads = TokenReads(store)
    for _ in range(3):
        never.authenticate(token, now=0.0)
    assert reads.count == 3
    two = AccessControl(store, token_ttl=TTL, remembered_tokens=2)
    tokens = [two.issue(f"t{i}", Role.VIEWER, now=NOW)[1] for i in range(3)]
    reads.count = 0
    for t in tokens:  # the third pushes out the first
        two.authenticate(t, now=0.0)
    two.authenticate(tokens[2], now=0.0)
    two.authenticate(tokens[1], now=0.0)
    assert reads.count == 3
    two.authenticate(tokens[0], now=0.0)
    assert reads.count == 4


def test_bad_cache_settings_are_refused(store: Store) -> None:
    with pytest.raises(ConfigurationError, match="token_ttl"):
        AccessControl(store, token_ttl=-1.0)
    with pytest.raises(ConfigurationError, match="remembered_tokens"):
        AccessControl(store, remembered_tokens=0)
