"""The coordinator's registry of site identity keys (Ed25519 public keys).

An administrator enrols each site's public identity key (``fedlens keys enroll``), received
out of band from the site's operator; the aggregator verifies the site's signed key
advertisements against it. The registry lives in the coordinator's database, beside the
:class:`~server.storage.Store`'s tables, and every enrolment and every refusal goes into
the store's audit log.

A site keeps its key: enrolling a different key for an enrolled site is refused unless the
administrator asks to replace it, so a mistyped site id cannot silently take over another
site's identity.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import DateTime, LargeBinary, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedlens.errors import (
    AuthenticationError,
    ConfigurationError,
    NotFoundError,
)
from fedlens.identity import check_public_key, check_site_id, fingerprint
from server.storage import Store

__all__ = ["Enrolment", "IdentityRegistry"]

logger = logging.getLogger(__name__)

AUDIT_ACTION = "enroll_identity"


class _Base(DeclarativeBase):
    pass


class _SiteIdentityRow(_Base):
    __tablename__ = "site_identities"

    site_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    enrolled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Enrolment:
    """What :meth:`IdentityRegistry.enroll` did.

    Attributes
    ----------
    site_id
        The site.
    fingerprint
        The enrolled key's fingerprint (:func:`fedlens.identity.fingerprint`).
    outcome
        ``enrolled`` (a new site), ``replaced`` (a new key for an enrolled site) or
        ``unchanged`` (the site already had this key).
    """

    site_id: str
    fingerprint: str
    outcome: Literal["enrolled", "replaced", "unchanged"]


class IdentityRegistry:
    """Enrolled site identity keys, in the database of ``store``.

    Parameters
    ----------
    store
        The coordinator's store: the registry's table ``site_identities`` is created on its
        engine, and enrolments are audited in its audit log.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        store.create_tables(_Base.metadata, "site_identities table")

    def _session(self) -> AbstractContextManager[Session]:
        return self._store.session()

    def enroll(
        self,
        site_id: str,
        public_key: bytes,
        *,
        now: datetime,
        replace: bool = False,
        actor: str = "admin",
    ) -> Enrolment:
        """Enrol ``public_key`` (raw 32 bytes) as the identity of ``site_id``.

        Enrolling the key a site already has changes nothing. The outcome, or the reason
        for a refusal, is written to the audit log with the key's fingerprint.

        Raises
        ------
        ConfigurationError
            The site id is invalid, the key is not a valid Ed25519 public key (32 bytes
            encoding a curve point of large order), or the site is enrolled with a
            different key and ``replace`` is false. Nothing is stored.
        """
        outcome: Literal["enrolled", "replaced", "unchanged"]
        try:
            check_site_id(site_id)
            key = check_public_key(bytes(public_key), source=f"identity key of site {site_id}")
            with self._session() as s:
                row = s.get(_SiteIdentityRow, site_id)
                if row is None:
                    s.add(
                        _SiteIdentityRow(
                            site_id=site_id, public_key=key, enrolled_at=now, updated_at=now
                        )
                    )
                    outcome, detail = "enrolled", f"key {fingerprint(key)}"
                elif bytes(row.public_key) == key:
                    outcome, detail = "unchanged", f"key {fingerprint(key)}"
                elif not replace:
                    raise ConfigurationError(
                        f"site {site_id} is already enrolled with key "
                        f"{fingerprint(bytes(row.public_key))}, not {fingerprint(key)}; "
                        "replace it explicitly if the site has a new key"
                    )
                else:
                    old = fingerprint(bytes(row.public_key))
                    row.public_key, row.updated_at = key, now
                    outcome, detail = "replaced", f"key {old} replaced by {fingerprint(key)}"
        except ConfigurationError as exc:
            self._audit(now, actor, site_id, "refused", str(exc))
            raise
        self._audit(now, actor, site_id, outcome, detail)
        logger.info("identity of site %s: %s (%s)", site_id, outcome, fingerprint(key))
        return Enrolment(site_id=site_id, fingerprint=fingerprint(key), outcome=outcome)

    def record_refusal(
        self, site_id: str, reason: str, *, now: datetime, actor: str = "admin"
    ) -> None:
        """Audit an enrolment refused before it reached :meth:`enroll` (an unreadable key)."""
        self._audit(now, actor, site_id, "refused", reason)

    def admit(self, site_id: str, presented: bytes, *, strict: bool, now: datetime) -> None:
        """Check the identity key a site presents against its enrolment.

        Without an enrolment, a strict registry refuses the site; otherwise the key is
        enrolled now (first-use enrolment, audited like any enrolment) and every later
        presentation must match it.

        Raises
        ------
        AuthenticationError
            The site is not enrolled and ``strict``, or presents another key; or the
            presented key is not a valid identity key.
        """
        try:
            enrolled = self.public_key(site_id)
        except NotFoundError:
            if strict:
                raise AuthenticationError(
                    f"site {site_id} is not enrolled; an admin enrols it with `fedlens keys enroll`"
                ) from None
            try:
                self.enroll(site_id, presented, now=now, actor=f"{site_id} (first use)")
            except ConfigurationError as exc:
                raise AuthenticationError(str(exc)) from None
            return
        if not hmac.compare_digest(enrolled, bytes(presented)):
            raise AuthenticationError(
                f"site {site_id} presented an identity key that differs from its enrolment"
            )

    def public_key(self, site_id: str) -> bytes:
        """The enrolled raw public key of ``site_id``; :class:`NotFoundError` if none."""
        with self._session() as s:
            row = s.get(_SiteIdentityRow, site_id)
            if row is None:
                raise NotFoundError(f"site {site_id!r} has no enrolled identity key")
            return bytes(row.public_key)

    def enrolled(self) -> dict[str, bytes]:
        """Every enrolled site's raw public key, by site id (sorted)."""
        with self._session() as s:
            rows = s.scalars(select(_SiteIdentityRow).order_by(_SiteIdentityRow.site_id))
            return {row.site_id: bytes(row.public_key) for row in rows}

    def _audit(self, now: datetime, actor: str, site_id: str, outcome: str, detail: str) -> None:
        self._store.audit(
            now=now,
            actor=actor,
            action=AUDIT_ACTION,
            outcome=outcome,
            detail=f"site {site_id[:128]!r}: {detail}",
        )
