"""The analysts' dashboard: a web page served by the coordinator beside its gRPC services.

``fedlens server --dashboard HOST:PORT`` starts it in the server's process, on the same
store, job queue and access control as the ``Query`` service, so a page and a gRPC call
see the same releases and the same refusals:

- ``/`` an overview: newest releases, the job queue, the budget spent per site over time;
- ``/releases`` and ``/releases/{id}``: each release with its plots and plain-language card;
- ``/jobs`` and ``/jobs/{id}``: the queue, and a form to submit a job (analysts and admins);
- ``/budgets``: every site's mirrored ledger;
- ``/login`` and ``/logout``: a token exchanged for a session (:mod:`server.dashboard_sessions`).

Roles follow the gRPC API (viewer reads, analyst also submits); each request passes the
same rate limit and each refusal goes to the same audit log, under the method names
``dashboard/<Page>``. Nothing is fetched from another host: pages have no script, their
stylesheet and SVG plots are inline (see :mod:`server.dashboard_pages`), and every
response forbids loading anything else (``Content-Security-Policy: default-src 'none'``).

The dashboard speaks plain HTTP. Bind it to loopback (the default) or put a TLS proxy in
front of it: session cookies are marked ``Secure`` only when ``secure_cookies`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from explain.registry import available_kinds
from fedlens.errors import (
    AuthenticationError,
    BudgetExceededError,
    ConfigurationError,
    FedlensError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
)
from fedlens.jobs import Job, JobRequest
from server import dashboard_pages as pages
from server.access import AccessControl, Principal, Role
from server.dashboard_pages import Viewer
from server.dashboard_sessions import OPEN_PRINCIPAL, DashboardSession, SessionStore
from server.jobs import FACTOR_KINDS, JobQueue
from server.query_handler import QueryHandler

__all__ = ["COOKIE", "DashboardServer", "create_app", "start_dashboard"]

logger = logging.getLogger(__name__)

COOKIE = "fedlens_session"
MAX_FORM_BYTES = 64 * 1024
LIST_LIMIT = 200
OVERVIEW_LIMIT = 10
_EPOCH = datetime.fromtimestamp(0, UTC)
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_STATUS: tuple[tuple[type[FedlensError], int], ...] = (
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (RateLimitedError, 429),
    (NotFoundError, 404),
    (BudgetExceededError, 409),
    (ConfigurationError, 400),
)


def _status(exc: FedlensError) -> int:
    return next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)


def _job_kinds() -> list[str]:
    return sorted(k for k in available_kinds() if k not in FACTOR_KINDS)


def _params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"parameters line {number} is not key=value: {line[:64]!r}")
        params[key.strip()] = value.strip()
    return params


class _RefusedError(Exception):
    """A request refused before its page ran: the response to send instead."""

    def __init__(self, response: Response) -> None:
        self.response = response


def create_app(
    query: QueryHandler,
    jobs: JobQueue,
    access: AccessControl | None,
    *,
    sessions: SessionStore | None = None,
    secure_cookies: bool = False,
) -> FastAPI:
    """The dashboard as an ASGI application (see the module docstring)."""
    sessions = sessions if sessions is not None else SessionStore(access)
    app = FastAPI(title="fedlens dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    open_access = access is None

    def html(body: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(body, status_code=status, headers=_SECURITY_HEADERS)

    def refuse(exc: FedlensError, session: DashboardSession | None) -> HTMLResponse:
        status = _status(exc)
        return html(pages.error_page(status, str(exc), viewer=viewer(session)), status)

    def viewer(session: DashboardSession | None) -> Viewer | None:
        if session is None:
            return None
        return Viewer(session.principal, session.csrf, open_access)

    def enter(request: Request, page: str, needed: Role) -> DashboardSession:
        """The caller's session, admitted to ``page``; raises _RefusedError otherwise."""
        if open_access:
            return DashboardSession("", OPEN_PRINCIPAL, "", _EPOCH, _EPOCH)
        session = sessions.check(request.cookies.get(COOKIE))
        if session is None:
            raise _RefusedError(
                RedirectResponse("/login", status_code=303, headers=_SECURITY_HEADERS)
            )
        principal = session.principal
        assert access is not None
        try:
            access.admit(principal, f"dashboard/{page}", needed)
        except FedlensError as exc:
            access.refused(f"dashboard/{page}", f"{principal.name} ({principal.token_id})", exc)
            raise _RefusedError(refuse(exc, session)) from None
        return session

    async def form_of(request: Request, session: DashboardSession | None) -> dict[str, str]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise _RefusedError(
                refuse(
                    ConfigurationError(f"the form is {len(body)} bytes; at most {MAX_FORM_BYTES}"),
                    session,
                )
            )
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=16)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _RefusedError(
                refuse(ConfigurationError(f"malformed form: {exc}"), None)
            ) from None
        form = {k: v[0] for k, v in fields.items()}
        if (
            session is not None
            and not open_access
            and not SessionStore.csrf_matches(session, form.get("csrf", ""))
        ):
            raise _RefusedError(
                refuse(
                    PermissionDeniedError("the form's CSRF token does not match your session"),
                    session,
                )
            )
        return form

    @app.exception_handler(_RefusedError)
    async def _refused(_: Request, exc: _RefusedError) -> Response:
        return exc.response

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response("ok", media_type="text/plain", headers=_SECURITY_HEADERS)

    @app.get("/login")
    async def login_form() -> Response:
        if open_access:
            return RedirectResponse("/", status_code=303)
        return html(pages.login_page())

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await form_of(request, None)
        try:
            session = await run_in_threadpool(sessions.open, form.get("token", ""))
        except FedlensError as exc:
            return html(pages.login_page(error=str(exc)), _status(exc))
        response = RedirectResponse("/", status_code=303, headers=_SECURITY_HEADERS)
        response.set_cookie(
            COOKIE,
            session.session_id,
            httponly=True,
            samesite="strict",
            secure=secure_cookies,
            path="/",
        )
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session = sessions.check(request.cookies.get(COOKIE))
        if session is not None:
            await form_of(request, session)
            sessions.close(session.session_id)
        response = RedirectResponse("/login", status_code=303, headers=_SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def page(
        request: Request, name: str, needed: Role, render: Callable[[Viewer], str]
    ) -> Response:
        session = enter(request, name, needed)
        try:
            return html(
                await run_in_threadpool(
                    render, Viewer(session.principal, session.csrf, open_access)
                )
            )
        except FedlensError as exc:
            return refuse(exc, session)

    @app.get("/")
    async def overview(request: Request) -> Response:
        return await page(
            request,
            "Overview",
            Role.VIEWER,
            lambda v: pages.overview_page(
                query.list_releases(limit=OVERVIEW_LIMIT),
                jobs.list_jobs(limit=OVERVIEW_LIMIT),
                query.list_budgets(),
                viewer=v,
            ),
        )

    @app.get("/releases")
    async def releases(request: Request, kind: str = "") -> Response:
        return await page(
            request,
            "ListReleases",
            Role.VIEWER,
            lambda v: pages.releases_page(
                query.list_releases(limit=LIST_LIMIT, kind=kind),
                sorted(available_kinds()),
                kind=kind,
                viewer=v,
            ),
        )

    @app.get("/releases/{release_id}")
    async def release(request: Request, release_id: str) -> Response:
        return await page(
            request,
            "GetRelease",
            Role.VIEWER,
            lambda v: pages.release_page(query.get_release(release_id), viewer=v),
        )

    @app.get("/budgets")
    async def budgets(request: Request) -> Response:
        return await page(
            request,
            "ListBudgets",
            Role.VIEWER,
            lambda v: pages.budgets_page(
                query.list_budgets(reserved=jobs.reserved_epsilon()), viewer=v
            ),
        )

    @app.get("/jobs")
    async def job_list(request: Request) -> Response:
        return await page(
            request,
            "ListJobs",
            Role.VIEWER,
            lambda v: pages.jobs_page(
                jobs.list_jobs(limit=LIST_LIMIT),
                _job_kinds(),
                viewer=v,
            ),
        )

    @app.get("/jobs/{job_id}")
    async def job(request: Request, job_id: str) -> Response:
        return await page(
            request,
            "GetJob",
            Role.VIEWER,
            lambda v: pages.job_page(jobs.get(job_id), viewer=v),
        )

    @app.post("/jobs")
    async def submit(request: Request) -> Response:
        session = enter(request, "SubmitJob", Role.ANALYST)
        form = await form_of(request, session)
        principal = session.principal
        try:
            job_request = JobRequest(
                kind=form.get("kind", "").strip(),
                params=_params(form.get("params", "")),
                cohort=form.get("cohort", "").strip(),
                query_input=form.get("query_input", "").strip(),
            )
            job = await run_in_threadpool(_submit, jobs, access, principal, job_request)
        except FedlensError as exc:
            listing = await run_in_threadpool(jobs.list_jobs, limit=LIST_LIMIT)
            return html(
                pages.jobs_page(
                    listing,
                    _job_kinds(),
                    error=str(exc),
                    form=dict(form),
                    viewer=Viewer(principal, session.csrf, open_access),
                ),
                _status(exc),
            )
        return RedirectResponse(f"/jobs/{job.job_id}", status_code=303, headers=_SECURITY_HEADERS)

    return app


def _submit(
    jobs: JobQueue, access: AccessControl | None, principal: Principal, request: JobRequest
) -> Job:
    """Submit as the gRPC ``SubmitJob`` does: under the caller's name and allowance."""
    who = f"{principal.name} ({principal.token_id})"
    allowance = access.allowance(principal.token_id) if access is not None else None
    return jobs.submit(request, submitted_by=who, allowance=allowance)


@dataclass
class DashboardServer:
    """A dashboard being served by uvicorn in a thread of this process."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_dashboard(
    query: QueryHandler,
    jobs: JobQueue,
    access: AccessControl | None,
    *,
    address: str = "127.0.0.1:0",
    secure_cookies: bool = False,
    startup_timeout_s: float = 10.0,
) -> DashboardServer:
    """Serve the dashboard on ``address`` (``host:port``; port 0 picks a free one).

    Raises
    ------
    ConfigurationError
        ``address`` is malformed or cannot be bound, or the server did not start.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigurationError(f"dashboard address must be host:port, got {address!r}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), int(port_text)))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot bind the dashboard to {address!r}: {exc}") from None
    port = sock.getsockname()[1]
    app = create_app(query, jobs, access, secure_cookies=secure_cookies)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="none")
    server = uvicorn.Server(config)

    def run() -> None:
        asyncio.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, name="fedlens-dashboard", daemon=True)
    thread.start()
    deadline = threading.Event()
    for _ in range(int(startup_timeout_s / 0.05)):
        if server.started or not thread.is_alive():
            break
        deadline.wait(0.05)
    if not server.started:
        server.should_exit = True
        raise ConfigurationError(f"the dashboard did not start on {address!r}")
    logger.info("fedlens dashboard on http://%s:%d", host, port)
    return DashboardServer(server=server, thread=thread, host=host, port=port)
