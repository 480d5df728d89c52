"""The coordinator's identity registry over a real store, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlens.errors import ConfigurationError, NotFoundError
from fedlens.identity import fingerprint
from server.identities import IdentityRegistry
from server.storage import Store

pytestmark = pytest.mark.both_backends

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def new_key() -> bytes:
    return (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = Store(database_url)
    try:
        yield s
    finally:
        s.close()


def outcomes(store: Store) -> list[tuple[str, str]]:
    return [(e.action, e.outcome) for e in store.audit_entries()]


def test_enroll_then_read_back(store: Store) -> None:
    registry = IdentityRegistry(store)
    a, b = new_key(), new_key()
    first = registry.enroll("site-b", b, now=NOW)
    registry.enroll("site-a", a, now=NOW)
    assert (first.site_id, first.outcome, first.fingerprint) == (
        "site-b",
        "enrolled",
        fingerprint(b),
    )
    assert registry.public_key("site-a") == a
    assert registry.enrolled() == {"site-a": a, "site-b": b}
    assert list(registry.enrolled()) == ["site-a", "site-b"]
    assert outcomes(store) == [("enroll_identity", "enrolled")] * 2


def test_enrolling_the_same_key_again_changes_nothing(store: Store) -> None:
    registry = IdentityRegistry(store)
    key = new_key()
    registry.enroll("site-1", key, now=NOW)
    assert registry.enroll("site-1", key, now=NOW + timedelta(hours=1)).outcome == "unchanged"
    assert registry.public_key("site-1") == key
    assert outcomes(store)[-1] == ("enroll_identity", "unchanged")


def test_a_different_key_is_refused_unless_replaced(store: Store) -> None:
    registry = IdentityRegistry(store)
    old, new = new_key(), new_key()
    registry.enroll("site-1", old, now=NOW)
    with pytest.raises(ConfigurationError, match="site-1 is already enrolled with key") as info:
        registry.enroll("site-1", new, now=NOW)
    assert fingerprint(old) in str(info.value) and fingerprint(new) in str(info.value)
    assert registry.public_key("site-1") == old
    replaced = registry.enroll("site-1", new, now=NOW, replace=True)
    assert replaced.outcome == "replaced" and registry.public_key("site-1") == new
    entries = store.audit_entries()
    assert [e.outcome for e in entries] == ["enrolled", "refused", "replaced"]
    assert fingerprint(old) in entries[2].detail and fingerprint(new) in entries[2].detail
    assert all(e.actor == "admin" for e in entries)


def _encode(y: int, sign: int = 0) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (b"", "32 bytes, got 0"),
        (bytes(31), "32 bytes, got 31"),
        (new_key() + b"\x00", "32 bytes, got 33"),
        (_encode(1), "small order"),  # the neutral element
        (_encode(2**255 - 19 + 1), "not a point"),  # non-canonical y
        (_encode(2), "not a point"),  # y = 2 is off the curve
    ],
)
def test_malformed_keys_are_refused_and_audited(store: Store, key: bytes, message: str) -> None:
    registry = IdentityRegistry(store)
    with pytest.raises(ConfigurationError, match=message):
        registry.enroll("site-1", key, now=NOW)
    assert registry.enrolled() == {}
    entry = store.audit_entries()[-1]
    assert (entry.action, entry.outcome) == ("enroll_identity", "refused")
    assert message in entry.detail


def test_invalid_site_id_is_refused(store: Store) -> None:
    registry = IdentityRegistry(store)
    with pytest.raises(ConfigurationError, match="site id"):
        registry.enroll("../site", new_key(), now=NOW)
    assert registry.enrolled() == {}
    assert outcomes(store) == [("enroll_identity", "refused")]


def test_unknown_site_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError, match="site 'nobody' has no enrolled identity key"):
        IdentityRegistry(store).public_key("nobody")


def test_registry_lives_in_the_store_database_and_survives_reopening(database_url: str) -> None:
    url = database_url
    key = new_key()
    store = Store(url)
    IdentityRegistry(store).enroll("site-1", key, now=NOW)
    store.close()
    engine = sqlalchemy.create_engine(url)
    tables = set(sqlalchemy.inspect(engine).get_table_names())
    engine.dispose()
    assert {"site_identities", "audit_log", "releases"} <= tables
    reopened = Store(url)
    try:
        assert IdentityRegistry(reopened).public_key("site-1") == key
        assert len(reopened.audit_entries()) == 1
    finally:
        reopened.close()


def test_record_refusal_is_audited(store: Store) -> None:
    IdentityRegistry(store).record_refusal("site-1", "public key file missing", now=NOW)
    entry = store.audit_entries()[-1]
    assert entry.outcome == "refused" and "public key file missing" in entry.detail
