"""Durable state of open secure-aggregation rounds, so the aggregator can be restarted.

Every message a round accepts is appended to ``round_journal`` with the wall-clock time
it was accepted at; a masked vector is not journaled but added to the round's running sum
in ``round_sums``, in the same transaction as its journal entry, so a submission is either
counted once (sum and entry together) or not at all. After a restart the aggregator
replays each unfinished round's journal through a fresh state machine with the original
times, which rebuilds the same state (phases that closed at deadlines close at the same
deadlines), then puts the stored running sum back.

What is stored: public keys, signatures, sealed shares (opaque to the aggregator),
revealed shares and the masked running sum. The running sum reveals nothing without the
unmasking shares, and it is deleted when the round completes or aborts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import JSON, Float, Integer, LargeBinary, String, delete, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedlens.errors import IntegrityError
from fedlens.secagg_types import EncryptedShare, RevealedShare, ShareKind, SignedKeys
from fedlens.types import PrivacyCost
from privacy.secagg_params import SecAggParams
from privacy.secagg_server import ServerSession
from server.storage import Store

__all__ = ["JournalEntry", "Replayed", "RoundJournal", "replay"]


class _Base(DeclarativeBase):
    pass


class _JournalRow(_Base):
    __tablename__ = "round_journal"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[str] = mapped_column(String(128), index=True)
    at: Mapped[float] = mapped_column(Float)
    site_id: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class _SumRow(_Base):
    __tablename__ = "round_sums"

    round_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    running_sum: Mapped[bytes] = mapped_column(LargeBinary)


@dataclass(frozen=True)
class JournalEntry:
    at: float
    site_id: str
    action: str
    payload: dict[str, Any]


class RoundJournal:
    """The journal and running sums of open rounds, in the coordinator's database."""

    def __init__(self, store: Store) -> None:
        self._store = store
        store.create_tables(_Base.metadata, "round journal tables")

    def _session(self) -> AbstractContextManager[Session]:
        return self._store.session()

    def append(
        self,
        round_id: str,
        entry: JournalEntry,
        *,
        running_sum: np.ndarray | None = None,
        audit: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an entry in one commit with, optionally, the new running sum and an
        audit row (keyword arguments of :meth:`server.storage.Store.add_audit`)."""
        with self._store.transaction() as connection:
            if audit is not None:
                Store.add_audit(connection, **audit)
            connection.execute(
                insert(_JournalRow),
                {
                    "round_id": round_id,
                    "at": entry.at,
                    "site_id": entry.site_id,
                    "action": entry.action,
                    "payload": entry.payload,
                },
            )
            if running_sum is not None:
                blob = np.ascontiguousarray(running_sum, dtype="<u8").tobytes()
                updated = connection.execute(
                    update(_SumRow).where(_SumRow.round_id == round_id).values(running_sum=blob)
                )
                if updated.rowcount == 0:
                    connection.execute(insert(_SumRow), {"round_id": round_id, "running_sum": blob})

    def entries(self, round_id: str) -> list[JournalEntry]:
        with self._session() as s:
            rows = s.scalars(
                select(_JournalRow).where(_JournalRow.round_id == round_id).order_by(_JournalRow.id)
            ).all()
            return [JournalEntry(r.at, r.site_id, r.action, dict(r.payload)) for r in rows]

    def running_sum(self, round_id: str) -> np.ndarray | None:
        with self._session() as s:
            row = s.get(_SumRow, round_id)
            if row is None:
                return None
            return np.frombuffer(row.running_sum, dtype="<u8").astype(np.uint64)

    def forget(self, round_id: str) -> None:
        """Drop a finished round's journal and running sum."""
        with self._session() as s:
            s.execute(delete(_JournalRow).where(_JournalRow.round_id == round_id))
            s.execute(delete(_SumRow).where(_SumRow.round_id == round_id))


# -- payload codecs (JSON: bytes as hex) ------------------------------------------------


def keys_payload(keys: SignedKeys, identity_public: bytes) -> dict[str, Any]:
    return {
        "cipher_public": keys.cipher_public.hex(),
        "mask_public": keys.mask_public.hex(),
        "signature": keys.signature.hex(),
        "identity_public": identity_public.hex(),
    }


def keys_from_payload(round_id: str, site_id: str, p: dict[str, Any]) -> tuple[SignedKeys, bytes]:
    keys = SignedKeys(
        round_id,
        site_id,
        bytes.fromhex(p["cipher_public"]),
        bytes.fromhex(p["mask_public"]),
        bytes.fromhex(p["signature"]),
    )
    return keys, bytes.fromhex(p["identity_public"])


def shares_payload(shares: Sequence[EncryptedShare]) -> dict[str, Any]:
    return {"shares": [[item.receiver, item.ciphertext.hex()] for item in shares]}


def shares_from_payload(
    round_id: str, site_id: str, p: dict[str, Any]
) -> tuple[EncryptedShare, ...]:
    return tuple(
        EncryptedShare(round_id, site_id, receiver, bytes.fromhex(blob))
        for receiver, blob in p["shares"]
    )


def revealed_payload(shares: Sequence[RevealedShare]) -> dict[str, Any]:
    return {"shares": [[item.owner, item.kind.value, item.share.hex()] for item in shares]}


def revealed_from_payload(
    round_id: str, site_id: str, p: dict[str, Any]
) -> tuple[RevealedShare, ...]:
    return tuple(
        RevealedShare(round_id, site_id, owner, ShareKind(kind), bytes.fromhex(blob))
        for owner, kind, blob in p["shares"]
    )


@dataclass
class Replayed:
    """A round rebuilt from its journal: the state machine, identities and declared costs."""

    session: ServerSession
    identities: dict[str, bytes] = field(default_factory=dict)
    costs: dict[str, tuple[PrivacyCost, float]] = field(default_factory=dict)


def replay(
    params: SecAggParams,
    phase_timeout_s: float,
    entries: Sequence[JournalEntry],
    running_sum: np.ndarray | None,
) -> Replayed:
    """Feed a round's journal, with its original times, through a fresh state machine.

    Raises
    ------
    IntegrityError
        The journal does not start with the opening, holds an unknown action, ends with
        the round finished, or lacks the running sum of its submissions; or a replayed
        message is refused (the journal does not match the round).
    """
    if not entries or entries[0].action != "open":
        raise IntegrityError("its journal does not start with the opening")
    session = ServerSession(params, now=entries[0].at, phase_timeout_s=phase_timeout_s)
    out = Replayed(session)
    rid = params.round_id
    for entry in entries[1:]:
        site, p, at = entry.site_id, entry.payload, entry.at
        if entry.action == "advertise":
            keys, identity = keys_from_payload(rid, site, p)
            session.advertise(keys, identity, now=at)
            out.identities[site] = identity
        elif entry.action == "share":
            session.share(site, shares_from_payload(rid, site, p), now=at)
        elif entry.action == "submit":
            session.submit(site, None, now=at)
            cost = PrivacyCost(site, p["epsilon"], p["delta"], p["epsilon_total"])
            out.costs[site] = (cost, float(p["noise_std"]))
        elif entry.action == "unmask":
            session.unmask(site, revealed_from_payload(rid, site, p), now=at)
        elif entry.action == "withdraw":
            session.withdraw(site, str(p.get("reason", "")), now=at)
        else:
            raise IntegrityError(f"its journal holds an unknown action {entry.action!r}")
    if session.phase.finished:
        raise IntegrityError(f"its journal ends with the round {session.phase.value}")
    if session.submitted:
        if running_sum is None:
            raise IntegrityError("submissions are journaled but no running sum is stored")
        session.restore_sum(running_sum)
    return out
