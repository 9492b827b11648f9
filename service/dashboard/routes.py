"""The /dashboard pages (server-rendered) and the JSON endpoints their charts poll.

Pages answer a logged-out visitor with a redirect to the login form; the JSON endpoints
answer 401 (an ErrorBody, like the API). Both read the session cookie only: no key in URLs,
no Authorization header needed by the browser. Every POST form checks a CSRF token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal
from urllib.parse import quote

import jinja2
from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, RedirectResponse, Response

from service import job_retry, jobs
from service.api.jobs import enqueue
from service.auth import KeyInfo, KeyStore, digest
from service.dashboard import data, registry_view
from service.dashboard.session import (
    COOKIE_PATH,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    Session,
    Signer,
)
from service.errors import ApiError, JSONResp
from service.line_balance import check_line
from service.lines import list_lines
from service.models import JOB_STATUSES

log = logging.getLogger("prospect.dashboard")

HERE = FsPath(__file__).parent
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _ts(value: Any) -> str:
    """ISO timestamp -> '2026-01-02 03:04:05 UTC' (what an operator reads)."""
    if not value:
        return "–"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_env.filters["ts"] = _ts

#: Pages allow only their own scripts and styles: no inline script can run even if some
#: value escaped the template's escaping.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
        "object-src 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

NOTICES = {
    "cancel_requested": "Cancellation requested: the worker stops the run within a step.",
    "cancelled": "Job cancelled.",
    "already_finished": "The job had already finished; nothing to cancel.",
    "retried": ("Job queued again: it resumes from its newest checkpoint if its resume states "
                "are still there, else it starts over."),
    "retried_unsent": ("Job queued again; the broker is unreachable, so the reconciler sends "
                       "it once the broker is back."),
    "canary_set": "Canary started (or its percentage changed).",
    "promoted": "Promoted to production; a π_ref snapshot of it was requested.",
    "rolled_back": "Rolled back.",
    "rejected": "Checkpoint rejected; an evaluation still running stops within seconds.",
}

router = APIRouter(prefix="/dashboard", include_in_schema=False)


class LoginRequired(Exception):
    """Raised by page dependencies; answered with a 303 to the login form."""

    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


@dataclass(frozen=True)
class Viewer:
    session: Session
    key: KeyInfo
    csrf: str

    @property
    def is_admin(self) -> bool:
        return "admin" in self.key.scopes


async def _key_info(request: Request, key_digest: str) -> KeyInfo | None:
    store: KeyStore = request.app.state.keys
    info = store.cached(key_digest)
    if info is None:
        info = await run_in_threadpool(store.load, key_digest)
    if info is None or info.revoked:
        return None
    if info.expires_at is not None and info.expires_at <= datetime.now(UTC):
        return None
    return info


async def current_viewer(request: Request) -> Viewer | None:
    signer: Signer = request.app.state.dashboard_signer
    sess = signer.load(request.cookies.get(SESSION_COOKIE))
    if sess is None:
        return None
    info = await _key_info(request, sess.key_digest)
    if info is None or not info.allows("read"):
        return None
    return Viewer(sess, info, signer.csrf_token(sess))


async def page_viewer(request: Request) -> Viewer:
    viewer = await current_viewer(request)
    if viewer is None:
        # After logging in, come back here; a form's POST target cannot be revisited by GET.
        path = request.url.path if request.method == "GET" else "/dashboard"
        if request.url.query and request.method == "GET":
            path += "?" + request.url.query
        raise LoginRequired(path)
    return viewer


async def api_viewer(request: Request) -> Viewer:
    viewer = await current_viewer(request)
    if viewer is None:
        raise ApiError(401, "unauthenticated", "log in to the dashboard first",
                       [{"field": SESSION_COOKIE, "message": "missing, expired or revoked"}])
    return viewer


PageViewer = Annotated[Viewer, Depends(page_viewer)]
ApiViewer = Annotated[Viewer, Depends(api_viewer)]


def safe_next(value: str | None) -> str:
    """Only paths inside the dashboard: never an open redirect."""
    if (not value or not value.startswith("/dashboard") or value.startswith("//")
            or "\\" in value or len(value) > 512 or value.startswith("/dashboard/login")
            or any(ord(c) < 32 for c in value)):
        return "/dashboard"
    return value


def render(request: Request, template: str, status_code: int = 200, **ctx: Any
           ) -> HTMLResponse:
    settings = request.app.state.settings
    ctx.setdefault("viewer", None)
    ctx.setdefault("nav", "")
    ctx.setdefault("notice", None)
    ctx["poll_ms"] = int(settings.dashboard_poll_interval_s * 1000)
    html = _env.get_template(template).render(**ctx)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def _error_page(request: Request, viewer: Viewer | None, status: int, title: str,
                message: str) -> HTMLResponse:
    return render(request, "error.html", status, viewer=viewer, title=title, message=message)


def _cross_site(request: Request) -> bool:
    """Browsers label a form posted from another site; such a POST never changes state."""
    return request.headers.get("sec-fetch-site") == "cross-site"


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _set_cookie(resp: Response, request: Request, name: str, value: str, max_age: int) -> None:
    s = request.app.state.settings
    resp.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True,
                    secure=s.dashboard_cookie_secure, samesite=s.dashboard_cookie_samesite)


def _clear_cookie(resp: Response, request: Request, name: str) -> None:
    s = request.app.state.settings
    resp.delete_cookie(name, path=COOKIE_PATH, httponly=True, secure=s.dashboard_cookie_secure,
                       samesite=s.dashboard_cookie_samesite)


def _check_post(request: Request, viewer: Viewer, form: dict[str, str]) -> HTMLResponse | None:
    signer: Signer = request.app.state.dashboard_signer
    if _cross_site(request) or not signer.check_csrf(viewer.session, form.get("csrf_token")):
        return _error_page(request, viewer, 403, "Form expired",
                           "csrf_token: missing or invalid. Reload the page and try again.")
    return None


async def _admin_form(request: Request, viewer: Viewer, needs: str
                      ) -> tuple[dict[str, str], HTMLResponse | None]:
    """The posted form of an admin action, and the page refusing it, if any: a cross-site post
    or bad CSRF token, then a read-only key (``needs``: what the action is, for the page)."""
    form = await _form(request)
    bad = _check_post(request, viewer, form)
    if bad is None and not viewer.is_admin:
        bad = _error_page(request, viewer, 403, "Not allowed",
                          f"{needs} needs an admin key; this session's key is read-only.")
    return form, bad


def _no_such_job(request: Request, viewer: Viewer, job_id: int) -> HTMLResponse:
    return _error_page(request, viewer, 404, "No such job", f"job {job_id} does not exist")


# ---- login / logout --------------------------------------------------------------------

def _login_page(request: Request, next_path: str, error: str | None = None,
                status: int = 200) -> HTMLResponse:
    signer: Signer = request.app.state.dashboard_signer
    token = signer.login_csrf()
    resp = render(request, "login.html", status, nav="login", next_path=next_path,
                  csrf_token=token, error=error)
    _set_cookie(resp, request, LOGIN_CSRF_COOKIE, token, 3600)
    return resp


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> Response:  # noqa: A002
    if await current_viewer(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, safe_next(next))


@router.post("/login")
async def login(request: Request) -> Response:
    signer: Signer = request.app.state.dashboard_signer
    form = await _form(request)
    next_path = safe_next(form.get("next"))
    if _cross_site(request) or not signer.check_login_csrf(
            request.cookies.get(LOGIN_CSRF_COOKIE), form.get("csrf_token")):
        return _login_page(request, next_path, "The form expired; enter the key again.", 400)
    key = (form.get("key") or "").strip()
    if not key or len(key) > 256:
        return _login_page(request, next_path, "key: enter a read-scope API key.", 422)
    info = await _key_info(request, digest(key))
    if info is None:
        log.info("dashboard login refused: unknown, revoked or expired key")
        return _login_page(request, next_path, "key: unknown, revoked or expired.", 401)
    if not info.allows("read"):
        return _login_page(request, next_path, "key: this key lacks the 'read' scope.", 403)
    resp = RedirectResponse(next_path, status_code=303)
    _set_cookie(resp, request, SESSION_COOKIE, signer.issue(digest(key)),
                request.app.state.settings.dashboard_session_ttl_s)
    _clear_cookie(resp, request, LOGIN_CSRF_COOKIE)
    log.info("dashboard login", extra={"key_id": info.id})
    return resp


@router.post("/logout")
async def logout(request: Request, viewer: PageViewer) -> Response:
    form = await _form(request)
    bad = _check_post(request, viewer, form)
    if bad is not None:
        return bad
    resp = RedirectResponse("/dashboard/login", status_code=303)
    _clear_cookie(resp, request, SESSION_COOKIE)
    return resp


# ---- pages ---------------------------------------------------------------------------------

def _db(request: Request, fn: Any, *args: Any) -> Any:
    engine = request.app.state.engine

    def run() -> Any:
        with engine.connect() as conn:
            return fn(conn, *args)

    return run_in_threadpool(run)


def _db_begin(request: Request, fn: Any, *args: Any) -> Any:
    """As _db, in a transaction that commits: looking up a line may create the default one
    from settings (service.lines.get_line), as GET /v1/balance?line= does."""
    engine = request.app.state.engine

    def run() -> Any:
        with engine.begin() as conn:
            return fn(conn, *args)

    return run_in_threadpool(run)


#: ``?line=``: the model line whose feedback scope the balance card and chart use; absent,
#: every event (as GET /v1/balance without ``line``). Checked by check_line (422 naming it).
LineParam = Annotated[str | None, Query()]


def _overview_state(conn: Any, settings: Any, line: str | None = None) -> dict[str, Any]:
    since, until = data.window(1)
    return {"balance": data.balance_now(conn, settings, line)[1],
            "active_jobs": data.active_jobs(conn),
            "ingestion": data.ingestion(conn, since, until),
            "rollout": registry_view.summary(conn)}


def _overview_page_state(conn: Any, settings: Any, line: str | None) -> dict[str, Any]:
    state = _overview_state(conn, settings, line)
    state["lines"] = list_lines(conn, settings)
    return state


@router.get("")
async def overview(request: Request, viewer: PageViewer,
                   bucket: Literal["day", "hour"] = "day", line: LineParam = None) -> Response:
    """The overview; ``line`` scopes the balance card and chart to that line's feedback, and
    a link per line lets the operator switch when there are several."""
    settings = request.app.state.settings
    try:
        state = await _db_begin(request, _overview_page_state, settings, check_line(line))
    except ApiError as exc:
        if exc.status not in (404, 409, 422):
            raise
        title = "No such line" if exc.status == 404 else "Cannot show this line"
        return _error_page(request, viewer, exc.status, title, exc.message)
    queue = await run_in_threadpool(request.app.state.broker_depth.depth)
    return render(request, "overview.html", viewer=viewer, nav="overview", bucket=bucket,
                  queue=queue, line=line, **state)


@router.get("/jobs")
async def jobs_page(
    request: Request, viewer: PageViewer,
    status: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                      Query()] = None,
    before: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    size = 50

    def q(conn: Any) -> list[dict[str, Any]]:
        return jobs.list_jobs(conn, status=status, line=None, limit=size + 1, before_id=before)

    rows = await _db(request, q)
    more = len(rows) > size
    rows = [data.job_summary(r) for r in rows[:size]]
    return render(request, "jobs.html", viewer=viewer, nav="jobs", jobs=rows, status=status,
                  statuses=JOB_STATUSES, next_before=rows[-1]["id"] if more and rows else None)


JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.get("/jobs/{job_id}")
async def job_page(request: Request, job_id: JobId, viewer: PageViewer,
                   notice: str | None = None) -> Response:
    return await _job_page(request, viewer, job_id, notice=NOTICES.get(notice or ""))


async def _job_page(request: Request, viewer: Viewer, job_id: int, notice: str | None = None,
                    error: str | None = None, status_code: int = 200) -> HTMLResponse:
    try:
        row = await _db(request, jobs.get_job, job_id)
    except ApiError as exc:
        if exc.status == 404:
            return _no_such_job(request, viewer, job_id)
        raise
    return render(request, "job.html", status_code, viewer=viewer, nav="jobs",
                  job=data.job_summary(row), row=row, notice=notice, error=error,
                  retryable=row["status"] in job_retry.RETRYABLE)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: JobId, viewer: PageViewer) -> Response:
    _, bad = await _admin_form(request, viewer, "Cancelling a job")
    if bad is not None:
        return bad
    try:
        job = await run_in_threadpool(jobs.request_cancel, request.app.state.engine, job_id)
        notice = "cancelled" if job["status"] == "cancelled" else "cancel_requested"
    except ApiError as exc:
        if exc.status == 404:
            return _no_such_job(request, viewer, job_id)
        if exc.status != 409:
            raise
        notice = "already_finished"
    log.info("job cancel requested from the dashboard",
             extra={"job_id": job_id, "key_id": viewer.key.id, "outcome": notice})
    return RedirectResponse(f"/dashboard/jobs/{job_id}?notice={notice}", status_code=303)


@router.post("/jobs/{job_id}/retry")
async def retry_job(request: Request, job_id: JobId, viewer: PageViewer) -> Response:
    """POST /v1/jobs/{id}/retry from the job page; a refusal re-renders it with the reason."""
    _, bad = await _admin_form(request, viewer, "Retrying a job")
    if bad is not None:
        return bad
    state = request.app.state

    def run() -> bool:
        job_retry.retry_job(state.engine, state.settings, job_id, retried_by=viewer.key.id)
        return enqueue(state, job_id)

    try:
        sent = await run_in_threadpool(run)
    except ApiError as exc:
        if exc.status == 404:
            return _no_such_job(request, viewer, job_id)
        if exc.status != 409:
            raise
        return await _job_page(request, viewer, job_id, error=exc.message, status_code=409)
    notice = "retried" if sent else "retried_unsent"
    return RedirectResponse(f"/dashboard/jobs/{job_id}?notice={notice}", status_code=303)


async def _checkpoints(request: Request, viewer: Viewer, notice: str | None = None,
                       error: str | None = None, status_code: int = 200) -> HTMLResponse:
    since = data.now_utc() - timedelta(days=7)
    settings = request.app.state.settings

    def q(conn: Any) -> dict[str, Any]:
        return {"registry": registry_view.overview(conn, since),
                "live": registry_view.live_reports(conn, settings),
                "versions": data.version_rates(conn, since)}

    state = await _db(request, q)
    return render(request, "checkpoints.html", status_code, viewer=viewer, nav="checkpoints",
                  notice=notice, error=error, can_act=registry_view.actions_available(),
                  **state)


@router.get("/checkpoints")
async def checkpoints_page(request: Request, viewer: PageViewer,
                           notice: str | None = None) -> Response:
    return await _checkpoints(request, viewer, NOTICES.get(notice or ""))


@router.post("/checkpoints/{checkpoint_id}/{action}")
async def checkpoint_action(request: Request, checkpoint_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
                            action: Literal["promote", "rollback", "reject"],
                            viewer: PageViewer) -> Response:
    """Promote (start or re-weight a canary, or make production), roll back, or reject, as
    POST /v1/checkpoints/{id}/promote, /v1/rollback and /v1/checkpoints/{id}/reject do;
    refusals re-render the page with the registry's sentence (4xx)."""
    form, bad = await _admin_form(request, viewer, "Changing a rollout")
    if bad is not None:
        return bad
    try:
        notice = await run_in_threadpool(registry_view.act, request.app.state, checkpoint_id,
                                         action, form, viewer.key.id)
    except registry_view.ActionError as exc:
        return await _checkpoints(request, viewer, error=exc.message,
                                  status_code=exc.status)
    log.info("rollout change from the dashboard", extra={
        "checkpoint_id": checkpoint_id, "action": action, "key_id": viewer.key.id})
    return RedirectResponse(f"/dashboard/checkpoints?notice={notice}", status_code=303)


# ---- JSON behind the charts ------------------------------------------------------------------

def _json(payload: Any) -> JSONResp:
    return JSONResp(payload, headers={"Cache-Control": "no-store"})


@router.get("/api/balance")
async def api_balance(
    request: Request, _v: ApiViewer,
    bucket: Literal["day", "hour"] = "day",
    days: Annotated[int | None, Query(ge=1, le=366)] = None,
    line: LineParam = None,
) -> Response:
    """Counts per bucket over the window (default 30 days daily, 2 days hourly) and the
    current balance, both within ``line``'s feedback scope when given (its ``balance`` is
    then what GET /v1/balance?line= answers)."""
    line = check_line(line)
    span = days or (30 if bucket == "day" else 2)
    if bucket == "hour" and span > 14:
        raise ApiError(422, "invalid", "days: at most 14 with hourly buckets",
                       [{"field": "days", "message": "at most 14 with bucket=hour"}])
    since, until = data.window(span)
    settings = request.app.state.settings

    def q(conn: Any) -> dict[str, Any]:
        scope, balance = data.balance_now(conn, settings, line)
        return {"counts": data.label_counts(conn, bucket, since, until, scope),
                "balance": balance}

    return _json(await _db_begin(request, q))


@router.get("/api/ingestion")
async def api_ingestion(request: Request, _v: ApiViewer,
                        hours: Annotated[int, Query(ge=1, le=24 * 14)] = 48) -> Response:
    since, until = data.window(hours / 24)
    return _json(await _db(request, data.ingestion, since, until))


@router.get("/api/status")
async def api_status(request: Request, _v: ApiViewer, line: LineParam = None) -> Response:
    """Balance (within ``line``'s scope when given), queue depth, active jobs,
    production/canary: the overview's cards."""
    settings = request.app.state.settings
    state = await _db_begin(request, _overview_state, settings, check_line(line))
    state["queue"] = await run_in_threadpool(request.app.state.broker_depth.depth)
    state["generated_at"] = data.now_utc().isoformat()
    return _json(state)


@router.get("/api/jobs/{job_id}")
async def api_job(request: Request, job_id: JobId, _v: ApiViewer) -> Response:
    row = await _db(request, jobs.get_job, job_id)
    return _json(data.job_summary(row))


@router.get("/api/jobs/{job_id}/metrics")
async def api_job_metrics(
    request: Request, job_id: JobId, _v: ApiViewer,
    after_step: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 2000,
) -> Response:
    def q(conn: Any) -> dict[str, Any]:
        job = data.job_summary(jobs.get_job(conn, job_id))
        return {**data.metric_series(conn, job_id, after_step, limit), "job": job}

    return _json(await _db(request, q))


@router.get("/api/versions")
async def api_versions(request: Request, _v: ApiViewer,
                       days: Annotated[int, Query(ge=1, le=366)] = 7) -> Response:
    since = data.now_utc() - timedelta(days=days)
    return _json({"since": since.isoformat(),
                  "versions": await _db(request, data.version_rates, since)})


@router.get("/api/checkpoints")
async def api_checkpoints(request: Request, _v: ApiViewer) -> Response:
    since = data.now_utc() - timedelta(days=7)
    settings = request.app.state.settings

    def q(conn: Any) -> dict[str, Any]:
        return {**registry_view.overview(conn, since),
                "live_comparison": registry_view.live_reports(conn, settings)}

    return _json(await _db(request, q))


def login_redirect(next_path: str) -> RedirectResponse:
    return RedirectResponse(f"/dashboard/login?next={quote(next_path, safe='/')}",
                            status_code=303)
