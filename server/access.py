"""Who may call what: analyst tokens bound to roles, checked for every call in one interceptor.

Roles, each allowing what the one below it does:

- ``viewer``: read releases and budgets, explain an input with the stored model;
- ``analyst``: also submit jobs (explanation rounds);
- ``admin``: also open rounds, publish and fetch models, report ledgers and finish jobs
  (the coordinator's own ServerApp holds an admin token), and manage tokens.

Sites do not hold tokens: the secure-aggregation calls are open, and each message is
authenticated by the protocol itself (Ed25519-signed key advertisements from enrolled
identities, sealed shares bound to both parties). Health and reflection are open.

A token is ``fl_<id>_<secret>`` with a 256-bit random secret; the store keeps its id, role
and the SHA-256 of the secret (a fast hash suffices for a secret of full entropy), and
compares in constant time. A token is shown once, when it is issued, and may be issued
with an expiry time, past which it is refused like a revoked one. Every refusal —
unknown, revoked or expired token, a role below the call's, a caller over its rate — is
written to the audit log with the method and the caller, never the token.

Rate limits are per token: a bucket of ``burst`` calls refilled at ``rate`` calls per
second (the clock is a parameter, so tests need no sleeping).

A token that authenticates is remembered for ``token_ttl`` seconds (5 by default), so that
a busy caller costs no database read per call. The guarantee: a revocation made through
the same :class:`AccessControl` takes effect at once, including for calls already
authenticating (what they read before the revocation is not remembered); one made
anywhere else — ``fedlens admin token revoke`` in another process, or another
:class:`AccessControl` on the same database — takes effect within ``token_ttl`` seconds.
Only successes are remembered, by token id with the SHA-256 of the secret, and a
presented secret is still compared with it in constant time. ``token_ttl=0`` reads the
database on every call.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from sqlalchemy import Float, LargeBinary, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fedlens.errors import (
    AuthenticationError,
    ConfigurationError,
    FedlensError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
)
from fedlens.status_codes import status_code_for
from server.database import UtcDateTime
from server.storage import Store

__all__ = [
    "METHOD_ROLES",
    "AccessControl",
    "AccessInterceptor",
    "Principal",
    "Role",
    "TokenRecord",
    "current_principal",
]

logger = logging.getLogger(__name__)

_PREFIX = "fl_"


class Role(enum.IntEnum):
    VIEWER = 1
    ANALYST = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ConfigurationError(
                f"unknown role {name!r}; expected admin, analyst or viewer"
            ) from None


_QUERY = "/fedlens.v1.Query/"
_AGGREGATION = "/fedlens.v1.Aggregation/"

# The least role each method needs; None: open (sites, authenticated by the protocol).
# A Query method missing here needs admin: new calls are closed until listed.
METHOD_ROLES: dict[str, Role | None] = {
    _QUERY + "ListReleases": Role.VIEWER,
    _QUERY + "GetRelease": Role.VIEWER,
    _QUERY + "ListBudgets": Role.VIEWER,
    _QUERY + "ExplainInput": Role.VIEWER,
    _QUERY + "GetJob": Role.VIEWER,
    _QUERY + "ListJobs": Role.VIEWER,
    _QUERY + "SubmitJob": Role.ANALYST,
    _AGGREGATION + "OpenRound": Role.ADMIN,
    _AGGREGATION + "PublishModel": Role.ADMIN,
    _AGGREGATION + "ReportLedger": Role.ADMIN,
    _AGGREGATION + "GetModel": Role.ADMIN,
    _AGGREGATION + "FinishJob": Role.ADMIN,
    **{
        _AGGREGATION + name: None
        for name in (
            "AdvertiseKeys",
            "GetPeerKeys",
            "ShareKeys",
            "GetShares",
            "SubmitMasked",
            "GetUnmaskRequest",
            "Unmask",
            "GetRoundStatus",
            "DeclineRound",
        )
    },
}


def required_role(method: str) -> Role | None:
    """The least role ``method`` needs, or None if it is open."""
    if method in METHOD_ROLES:
        return METHOD_ROLES[method]
    if method.startswith((_QUERY, _AGGREGATION)):
        return Role.ADMIN
    return None  # health, reflection


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    token_id: str
    name: str
    role: Role


current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "fedlens_principal", default=None
)


class _Base(DeclarativeBase):
    pass


class _TokenRow(_Base):
    __tablename__ = "access_tokens"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Added in schema version 3 (server/schema.py); None: the token does not expire.
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class _AllowanceRow(_Base):
    __tablename__ = "analyst_allowances"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    epsilon: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass(frozen=True)
class TokenRecord:
    """A token as :meth:`AccessControl.tokens` lists it (never its secret); times in UTC."""

    principal: Principal
    issued_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None

    def active(self, now: datetime) -> bool:
        """Neither revoked nor expired at ``now``."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def _aware(at: datetime | None) -> datetime | None:
    """The store's naive UTC times as aware ones, so that they compare with ``now``."""
    return at if at is None or at.tzinfo is not None else at.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Authenticated:
    principal: Principal
    secret_hash: bytes = field(repr=False)
    until: float  # on the AccessControl's clock
    expires_at: datetime | None


class AccessControl:
    """Tokens in the coordinator's database, and the per-token rate limits.

    Parameters
    ----------
    store
        The coordinator's store; the ``access_tokens`` table is created on its engine and
        refusals go to its audit log.
    rate, burst
        Calls per second each token may make on average, and in a burst.
    clock
        Monotonic seconds, for the rate limits and for how long a token is remembered.
    wall_clock
        The time of day in UTC, against which tokens expire.
    token_ttl
        Seconds an authenticated token is remembered (see the module doc); 0: never.
    remembered_tokens
        The most tokens remembered at once; past it, the longest remembered is forgotten.
    """

    def __init__(
        self,
        store: Store,
        *,
        rate: float = 50.0,
        burst: int = 100,
        clock: Callable[[], float] = time.monotonic,
        token_ttl: float = 5.0,
        remembered_tokens: int = 4096,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not rate > 0 or burst < 1:
            raise ConfigurationError(f"rate must be > 0 and burst >= 1, got {rate}, {burst}")
        if not (math.isfinite(token_ttl) and token_ttl >= 0) or remembered_tokens < 1:
            raise ConfigurationError(
                "token_ttl must be finite and >= 0 and remembered_tokens >= 1, "
                f"got {token_ttl}, {remembered_tokens}"
            )
        self._store = store
        self._rate, self._burst, self._clock = rate, burst, clock
        self._wall = wall_clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._token_ttl, self._remembered_tokens = token_ttl, remembered_tokens
        self._remembered: dict[str, _Authenticated] = {}
        self._revocations = 0  # bumped by every revoke, so a read it overtook is not kept
        store.create_tables(_Base.metadata, "access_tokens table")

    def issue(
        self, name: str, role: Role, *, now: datetime, expires_at: datetime | None = None
    ) -> tuple[Principal, str]:
        """A new token for ``name`` with ``role``, valid until ``expires_at`` (None: until
        revoked); the token itself is returned only here.

        Raises
        ------
        ConfigurationError
            The name is empty, too long or unprintable, or ``expires_at`` is not a
            timezone-aware time after ``now``.
        """
        if not name or len(name) > 128 or not name.isprintable():
            raise ConfigurationError(f"a token's name must be 1-128 printable characters: {name!r}")
        if expires_at is not None and (expires_at.tzinfo is None or expires_at <= now):
            raise ConfigurationError(
                f"a token's expiry must be a timezone-aware time after {now.isoformat()}, "
                f"got {expires_at.isoformat()}"
            )
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self._store.session() as s:
            s.add(
                _TokenRow(
                    token_id=token_id,
                    name=name,
                    role=role.name.lower(),
                    secret_hash=_hash(secret),
                    created_at=now,
                    revoked_at=None,
                    expires_at=expires_at,
                )
            )
        until = f", expires {expires_at.isoformat()}" if expires_at is not None else ""
        self._audit(
            now,
            "admin",
            "issue_token",
            "ok",
            f"{token_id} for {name} as {role.name.lower()}{until}",
        )
        return Principal(token_id, name, role), f"{_PREFIX}{token_id}_{secret}"

    def provision(self, name: str, role: Role, token: str, *, now: datetime) -> Principal:
        """Register a token the operator generated (``FEDLENS_ADMIN_TOKEN`` at start-up, so
        a deployment's coordinator and ServerApp can share a secret from the environment).

        A token already registered with this secret is left as it is.

        Raises
        ------
        ConfigurationError
            The token is not ``fl_<16 hex digits>_<secret of at least 32 characters>``, or
            its id is registered with another secret.
        """
        token_id, _, secret = token[len(_PREFIX) :].partition("_")
        well_formed = (
            token.startswith(_PREFIX)
            and len(token_id) == 16
            and all(c in "0123456789abcdef" for c in token_id)
            and len(secret) >= 32
        )
        if not well_formed:
            raise ConfigurationError(
                "a provisioned token must be fl_<16 hex digits>_<secret of 32+ characters>, "
                "e.g. fl_$(openssl rand -hex 8)_$(openssl rand -hex 32)"
            )
        with self._store.session() as s:
            row = s.get(_TokenRow, token_id)
            if row is not None:
                if not hmac.compare_digest(row.secret_hash, _hash(secret)):
                    raise ConfigurationError(
                        f"token id {token_id} is registered with another secret"
                    )
                return Principal(row.token_id, row.name, Role.parse(row.role))
            s.add(
                _TokenRow(
                    token_id=token_id,
                    name=name,
                    role=role.name.lower(),
                    secret_hash=_hash(secret),
                    created_at=now,
                    revoked_at=None,
                )
            )
        self._audit(now, "admin", "provision_token", "ok", f"{token_id} for {name}")
        return Principal(token_id, name, role)

    def revoke(self, token_id: str, *, now: datetime) -> Principal:
        with self._store.session() as s:
            row = s.get(_TokenRow, token_id)
            if row is None:
                raise NotFoundError(f"no token {token_id!r}")
            row.revoked_at = row.revoked_at or now
            principal = Principal(row.token_id, row.name, Role.parse(row.role))
        with self._lock:  # after the commit: a read from here on sees the revocation
            self._revocations += 1
            self._remembered.pop(token_id, None)
        self._audit(now, "admin", "revoke_token", "ok", token_id)
        return principal

    def set_allowance(self, token_id: str, epsilon: float | None, *, now: datetime) -> None:
        """Cap the ε a token's jobs may spend in all (None: no cap beyond the sites' budgets).

        Raises
        ------
        ConfigurationError
            ``epsilon`` is not finite and >= 0.
        NotFoundError
            No such token.
        """
        if epsilon is not None and (not math.isfinite(epsilon) or epsilon < 0):
            raise ConfigurationError(f"an allowance must be a finite ε >= 0, got {epsilon!r}")
        with self._store.session() as s:
            if s.get(_TokenRow, token_id) is None:
                raise NotFoundError(f"no token {token_id!r}")
            row = s.get(_AllowanceRow, token_id)
            if epsilon is None:
                if row is not None:
                    s.delete(row)
            elif row is None:
                s.add(_AllowanceRow(token_id=token_id, epsilon=epsilon, updated_at=now))
            else:
                row.epsilon, row.updated_at = epsilon, now
        self._audit(now, "admin", "set_allowance", "ok", f"{token_id}: {epsilon}")

    def allowance(self, token_id: str) -> float | None:
        """The ε a token's jobs may spend in all, or None if uncapped."""
        with self._store.session() as s:
            row = s.get(_AllowanceRow, token_id)
            return None if row is None else float(row.epsilon)

    def is_active(self, token_id: str) -> bool:
        """Whether ``token_id`` names a token that is neither revoked nor expired, read from
        the database now (not remembered)."""
        with self._store.session() as s:
            row = s.get(_TokenRow, token_id)
            if row is None or row.revoked_at is not None:
                return False
            expires_at = _aware(row.expires_at)
            return expires_at is None or self._wall() < expires_at

    def tokens(self) -> list[TokenRecord]:
        """Every token: who holds it, when it was issued, revoked and expires (never the
        secret), oldest first."""
        with self._store.session() as s:
            rows = s.scalars(select(_TokenRow).order_by(_TokenRow.created_at)).all()
            return [
                TokenRecord(
                    Principal(r.token_id, r.name, Role.parse(r.role)),
                    _aware(r.created_at) or r.created_at,
                    _aware(r.revoked_at),
                    _aware(r.expires_at),
                )
                for r in rows
            ]

    def authenticate(self, token: str, *, now: float | None = None) -> Principal:
        """The holder of ``token``; AuthenticationError for a malformed, unknown, revoked or
        expired one (expiry against ``wall_clock``).

        ``now`` is the time on the ``clock`` (read if None): a token authenticated within
        ``token_ttl`` seconds before it is not read from the database again (module doc).
        """
        if not token.startswith(_PREFIX) or token.count("_") < 2:
            raise AuthenticationError("malformed token: expected fl_<id>_<secret>")
        token_id, _, secret = token[len(_PREFIX) :].partition("_")
        at = self._clock() if now is None else now
        presented = _hash(secret)
        today = self._wall()
        with self._lock:
            known = self._remembered.get(token_id)
            revocations = self._revocations
        if (
            known is not None
            and at < known.until
            and (known.expires_at is None or today < known.expires_at)
            and hmac.compare_digest(known.secret_hash, presented)
        ):
            return known.principal
        with self._store.session() as s:
            row = s.get(_TokenRow, token_id)
            stored = row.secret_hash if row is not None else _hash("")
            valid = hmac.compare_digest(stored, presented) and row is not None
            if not valid or row is None:
                raise AuthenticationError("unknown token")
            if row.revoked_at is not None:
                with self._lock:
                    self._remembered.pop(token_id, None)
                raise AuthenticationError(f"token {token_id} was revoked")
            expires_at = _aware(row.expires_at)
            if expires_at is not None and today >= expires_at:
                raise AuthenticationError(
                    f"token {token_id} expired at {expires_at.isoformat(timespec='seconds')}"
                )
            principal = Principal(row.token_id, row.name, Role.parse(row.role))
        self._remember(
            _Authenticated(principal, stored, at + self._token_ttl, expires_at), revocations
        )
        return principal

    def _remember(self, entry: _Authenticated, revocations: int) -> None:
        if self._token_ttl <= 0:
            return
        with self._lock:
            if self._revocations != revocations:  # a revocation overtook the read
                return
            remembered = self._remembered
            remembered.pop(entry.principal.token_id, None)
            while len(remembered) >= self._remembered_tokens:
                del remembered[next(iter(remembered))]  # the longest remembered
            remembered[entry.principal.token_id] = entry

    def admit(self, principal: Principal, method: str, needed: Role) -> None:
        """Refuse a role below ``needed`` or a caller over its rate."""
        if principal.role < needed:
            raise PermissionDeniedError(
                f"{principal.name} is a {principal.role.name.lower()}; "
                f"{method.rsplit('/', 1)[-1]} needs {needed.name.lower()}"
            )
        now = self._clock()
        with self._lock:
            bucket = self._buckets.setdefault(principal.token_id, _Bucket(self._burst, now))
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
            bucket.at = now
            if bucket.tokens < 1:
                raise RateLimitedError(
                    f"{principal.name} is over its rate limit of {self._rate:g} calls/s; "
                    "retry later"
                )
            bucket.tokens -= 1

    def refused(self, method: str, actor: str, exc: FedlensError) -> None:
        self._audit(
            datetime.now(UTC), actor, "access_refused", type(exc).__name__, f"{method}: {exc}"
        )

    def _audit(self, now: datetime, actor: str, action: str, outcome: str, detail: str) -> None:
        try:
            with self._store.transaction() as conn:
                self._store.add_audit(
                    conn, now=now, actor=actor, action=action, outcome=outcome, detail=detail
                )
        except FedlensError:  # pragma: no cover - the refusal stands even if auditing fails
            logger.exception("could not audit %s", action)


def _bearer(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
            raise AuthenticationError("the authorization header must be 'Bearer <token>'")
    raise AuthenticationError("this call needs a token (authorization: Bearer <token>)")


class AccessInterceptor(grpc.ServerInterceptor):
    """Checks every call's token and role before its handler runs."""

    def __init__(self, access: AccessControl) -> None:
        self._access = access

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        needed = required_role(method)
        if handler is None or handler.unary_unary is None or needed is None:
            return handler
        inner = handler.unary_unary
        access = self._access

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            actor = "anonymous"
            try:
                principal = access.authenticate(_bearer(context))
                actor = f"{principal.name} ({principal.token_id})"
                access.admit(principal, method, needed)
            except FedlensError as exc:
                access.refused(method, actor, exc)
                context.abort(status_code_for(exc), str(exc))
            reset = current_principal.set(principal)
            try:
                return inner(request, context)
            finally:
                current_principal.reset(reset)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
