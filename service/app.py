"""create_app(settings): the FastAPI application, its middleware and error mapping.

Error policy: every answer is either a success or an ErrorBody with a 4xx naming the field;
a database that is down, locked or too slow answers 503 with Retry-After (connect, pool and
statement timeouts make sure it answers at all). A 500 would be a bug.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import (
    balance,
    checkpoints,
    feedback,
    health,
    jobs,
    privacy,
    references,
    serving,
)
from service import observability
from service.auth import KeyStore
from service.db import make_engine
from service.errors import ApiError, ErrorBody, JSONResp, loc_to_field
from service.logging_setup import configure_logging
from service.queue import make_celery
from service.ratelimit import RateLimiter, RateLimitMiddleware
from service.registry import ServingCache
from service.schemas import input_models
from service.settings import INSECURE_DEV_USER_ID_KEY, Settings

log = logging.getLogger("prospect.api")


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for bodies over ``limit`` bytes, decided before the body is buffered: at once from
    Content-Length, or as soon as a chunked body crosses the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    @staticmethod
    def reject(limit: int) -> JSONResp:
        return ApiError(413, "payload_too_large",
                        f"body: larger than the limit of {limit} bytes",
                        [{"field": "body", "message": f"at most {limit} bytes"}]).response()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self.reject(self.limit)(scope, receive, send)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self.reject(self.limit)(scope, receive, send)


def _retry_after(settings: Settings) -> JSONResp:
    return ApiError(503, "database_unavailable",
                    "the database is unavailable; retry later",
                    headers={"Retry-After": str(settings.retry_after_s)}).response()


def _non_json_body(request: Request, exc: RequestValidationError) -> JSONResp | None:
    """FastAPI parses a body as JSON only when the content-type says so; `curl -d` sends
    application/x-www-form-urlencoded, and the pydantic error about raw bytes ("Input should be
    a valid dictionary") would not tell the client why. 415 naming the header instead."""
    ctype = request.headers.get("content-type")
    if not ctype:
        return None
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return None
    if not any(tuple(e["loc"]) == ("body",) and isinstance(e.get("input"), bytes)
               for e in exc.errors()):
        return None
    msg = (f"content-type: the body must be JSON sent with 'content-type: application/json' "
           f"(got {media!r})")
    return ApiError(415, "unsupported_media_type", msg,
                    [{"field": "content-type", "message": "must be application/json"}]).response()


def _install_handlers(app: FastAPI, settings: Settings) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResp:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def request_validation(request: Request, exc: Exception) -> JSONResp:
        assert isinstance(exc, RequestValidationError)
        wrong_type = _non_json_body(request, exc)
        if wrong_type is not None:
            return wrong_type
        errs = [{"field": loc_to_field(tuple(e["loc"])), "message": e["msg"]}
                for e in exc.errors()]
        msg = "; ".join(f"{e['field']}: {e['message']}" for e in errs)
        return ApiError(422, "invalid", msg, errs).response()

    async def http_error(_: Request, exc: Exception) -> JSONResp:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and isinstance(exc.__cause__, _BodyTooLarge):
            # A chunked body crossed the limit while FastAPI read it for a pydantic model:
            # FastAPI reports any read failure as a 400, but this one is a 413.
            return BodyLimitMiddleware.reject(settings.max_body_bytes)
        if exc.status_code == 400:
            # FastAPI's own 400 is a JSON body it could not parse: name the field.
            return ApiError(400, "invalid_json", f"body: {exc.detail}",
                            [{"field": "body", "message": str(exc.detail)}],
                            headers=dict(exc.headers or {})).response()
        return ApiError(exc.status_code, "http_error", str(exc.detail),
                        headers=dict(exc.headers or {})).response()

    async def db_unavailable(_: Request, exc: Exception) -> JSONResp:
        log.warning("database unavailable: %s", exc.__class__.__name__, exc_info=exc)
        return _retry_after(settings)

    async def db_data_error(_: Request, exc: Exception) -> JSONResp:
        # Validation should have caught it; still the client's data, not a server fault.
        log.error("database rejected data", exc_info=exc)
        return ApiError(422, "invalid_data", "the database rejected a value in the request"
                        ).response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for cls in (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError,
                sa_exc.DisconnectionError):
        app.add_exception_handler(cls, db_unavailable)
    app.add_exception_handler(sa_exc.DataError, db_data_error)

    async def dbapi_error(request: Request, exc: Exception) -> JSONResp:
        assert isinstance(exc, sa_exc.DBAPIError)
        if exc.connection_invalidated:
            return await db_unavailable(request, exc)
        raise exc

    app.add_exception_handler(sa_exc.DBAPIError, dbapi_error)


def _install_openapi(app: FastAPI, models: dict[str, Any]) -> None:
    """Routes read raw bodies (per-item validation), so their request schemas are added here."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        tmpl = "#/components/schemas/{model}"
        for name in ("FeedbackIn", "PairIn"):
            js = models[name].model_json_schema(ref_template=tmpl)
            comps.update(js.pop("$defs", {}))
            comps[name] = js
        ref = {"$ref": "#/components/schemas/FeedbackIn"}
        pair_ref = {"$ref": "#/components/schemas/PairIn"}
        bodies = {
            "/v1/feedback": ref,
            "/v1/feedback/batch": {"anyOf": [
                {"type": "object", "properties": {"events": {"type": "array", "items": ref}},
                 "required": ["events"]},
                {"type": "array", "items": ref}]},
            "/v1/feedback/import-pairs": {"anyOf": [
                {"type": "object", "properties": {"pairs": {"type": "array", "items": pair_ref}},
                 "required": ["pairs"]},
                {"type": "array", "items": pair_ref}]},
        }
        for path, body in bodies.items():
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": body}}}
        # Every operation that takes a body can answer 400 (not JSON) and 413 (too large,
        # BodyLimitMiddleware), whether or not its router listed them.
        error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        comps.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template=tmpl))
        comps.update(ErrorBody.model_json_schema(ref_template=tmpl).pop("$defs", {}))
        for path, ops in schema["paths"].items():
            for op in ops.values():
                if isinstance(op, dict) and "requestBody" in op:
                    responses = op.setdefault("responses", {})
                    responses.setdefault("400", {"description": "Body is not valid JSON.",
                                                 "content": error_ref})
                    responses.setdefault("413", {"description": "Body larger than "
                                                 "PROSPECT_MAX_BODY_BYTES.",
                                                 "content": error_ref})
                    if path not in bodies:  # the feedback routes read JSON whatever the type
                        responses.setdefault("415", {"description": "A body sent with a "
                                                     "content-type other than JSON.",
                                                     "content": error_ref})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: from PROSPECT_* environment variables)."""
    settings = settings or Settings()
    if settings.log_format != "none":
        configure_logging(settings.log_format, settings.log_level)
    if settings.user_id_key == INSECURE_DEV_USER_ID_KEY and not settings.is_sqlite:
        log.warning("PROSPECT_USER_ID_KEY is the development default; set a secret key")
    engine = make_engine(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()
        app.state.celery.close()
        app.state.broker_depth.close()

    app = FastAPI(
        title="Prospect",
        version="0.1.0",
        description="Feedback ingestion for KTO training. Send `Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.keys = KeyStore(engine, settings.key_cache_ttl_s)
    app.state.celery = make_celery(settings, "prospect-api")
    app.state.models = input_models(settings)
    app.state.fast_models = input_models(settings, nul_checks=False)
    app.state.serving = ServingCache(settings.serving_cache_ttl_s)
    app.include_router(health.router)
    app.include_router(feedback.router)
    app.include_router(balance.router)
    app.include_router(jobs.router)
    app.include_router(references.router)
    app.include_router(checkpoints.router)
    app.include_router(serving.router)
    app.include_router(privacy.router)
    if settings.dashboard_enabled:
        from service import dashboard

        dashboard.install(app, settings)
    _install_handlers(app, settings)
    _install_openapi(app, app.state.models)
    # Per-key limits answer 429 before the body is read (inside the body limit, so a huge
    # body is refused first either way).
    app.state.rate_limiter = RateLimiter(settings)
    app.add_middleware(RateLimitMiddleware, limiter=app.state.rate_limiter, keys=app.state.keys)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.cors_origins:
        # Closed by default: without origins no Access-Control-* header is ever sent. Outside
        # the limits, so a browser can read a 413 or 429 too. Keys travel in headers, never in
        # cookies: no credentials.
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-User-Id",
                           "X-Request-Id"],
            expose_headers=["Retry-After", "Location", "X-Request-Id"], max_age=600)
    # Outermost: request id, latency and the access line also cover 413s and errors.
    observability.install(app, settings)
    return app
