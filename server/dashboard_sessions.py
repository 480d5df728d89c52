"""Browser sessions of the dashboard: a token exchanged once for a random session id.

The analyst pastes a token (the same ``fl_<id>_<secret>`` the gRPC API takes) into the
login form; :meth:`SessionStore.open` checks it with :meth:`server.access.AccessControl.
authenticate` and keeps only the resulting :class:`server.access.Principal` under a
random 256-bit session id, which travels in an ``HttpOnly``, ``SameSite=Strict`` cookie.
The token itself is never stored by the dashboard nor sent back to the browser.

Each session also carries a CSRF token that every form posts back (compared in constant
time), so a page of another origin cannot submit jobs in the analyst's name even where a
browser ignores ``SameSite``. Sessions end after ``idle_s`` without a request, after
``max_age_s`` in all, on logout, or when the server restarts (they live in memory);
a token revoked, or expiring, while a session is open ends that session at its next
request, because each request looks the token up again through :meth:`SessionStore.check`.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fedlens.errors import AuthenticationError
from server.access import AccessControl, Principal, Role

__all__ = ["OPEN_PRINCIPAL", "DashboardSession", "SessionStore"]

#: Who every request acts as when the server runs without access control.
OPEN_PRINCIPAL = Principal("open", "anyone (access control is off)", Role.ADMIN)


@dataclass
class DashboardSession:
    session_id: str
    principal: Principal
    csrf: str
    opened_at: datetime
    seen_at: datetime


class SessionStore:
    """Sessions in memory, keyed by their random id.

    Parameters
    ----------
    access
        The coordinator's access control; None when it runs with access control off,
        in which case every request is :data:`OPEN_PRINCIPAL`.
    idle_s, max_age_s
        Idle and absolute lifetimes of a session.
    clock
        The time, a parameter so that expiry is testable without waiting.
    """

    def __init__(
        self,
        access: AccessControl | None,
        *,
        idle_s: float = 3600.0,
        max_age_s: float = 12 * 3600.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._access = access
        self._idle = timedelta(seconds=idle_s)
        self._max_age = timedelta(seconds=max_age_s)
        self._clock = clock
        self._sessions: dict[str, DashboardSession] = {}
        self._lock = threading.Lock()

    @property
    def open_access(self) -> bool:
        return self._access is None

    def open(self, token: str) -> DashboardSession:
        """A new session for the holder of ``token``.

        Raises
        ------
        AuthenticationError
            The token is malformed, unknown or revoked; the refusal is audited.
        """
        if self._access is None:
            raise AuthenticationError("access control is off: there is nothing to log in to")
        try:
            principal = self._access.authenticate(token.strip())
        except AuthenticationError as exc:
            self._access.refused("dashboard/login", "anonymous", exc)
            raise
        now = self._clock()
        session = DashboardSession(
            session_id=secrets.token_urlsafe(32),
            principal=principal,
            csrf=secrets.token_urlsafe(32),
            opened_at=now,
            seen_at=now,
        )
        with self._lock:
            self._expire(now)
            self._sessions[session.session_id] = session
        return session

    def check(self, session_id: str | None) -> DashboardSession | None:
        """The live session ``session_id`` names, or None (unknown, expired, token revoked)."""
        if not session_id:
            return None
        now = self._clock()
        with self._lock:
            self._expire(now)
            session = self._sessions.get(session_id)
            if session is None:
                return None
            session.seen_at = now
        # One row read per request, so a revocation by any process ends the session at once.
        if self._access is not None and not self._access.is_active(session.principal.token_id):
            self.close(session_id)
            return None
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._sessions.pop(session_id, None)

    @staticmethod
    def csrf_matches(session: DashboardSession, submitted: str) -> bool:
        return hmac.compare_digest(session.csrf.encode(), submitted.encode())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expire(self, now: datetime) -> None:
        stale = [
            sid
            for sid, s in self._sessions.items()
            if now - s.seen_at > self._idle or now - s.opened_at > self._max_age
        ]
        for sid in stale:
            del self._sessions[sid]
