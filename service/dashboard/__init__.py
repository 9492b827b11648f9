"""Ops dashboard: server-rendered pages under /dashboard, charts drawn by a vendored uPlot.

``install(app, settings)`` mounts the pages, their JSON endpoints and the static files
(templates and static live in this package, so a wheel carries them and the pages work with
no internet).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from service.settings import Settings


def install(app: Any, settings: Settings) -> None:
    from service.dashboard.routes import HERE, LoginRequired, login_redirect, router
    from service.dashboard.session import SESSION_COOKIE, Signer

    app.state.dashboard_signer = Signer(settings)
    app.include_router(router)
    static = StaticFiles(directory=HERE / "static")

    async def static_files(scope: Any, receive: Any, send: Any) -> None:
        # FastAPI's router sets no scope["route"] for a mount, so the latency histogram
        # labelled every script and stylesheet "unmatched": name the mount here.
        scope["route"] = mount
        await static(scope, receive, send)

    app.mount("/dashboard/static", static_files, name="dashboard-static")
    [mount] = [r for r in app.routes if getattr(r, "name", None) == "dashboard-static"]

    async def to_login(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        resp = login_redirect(exc.next_path)
        if SESSION_COOKIE in request.cookies:  # expired or revoked: drop it
            resp.delete_cookie(SESSION_COOKIE, path="/dashboard")
        return resp

    app.add_exception_handler(LoginRequired, to_login)
