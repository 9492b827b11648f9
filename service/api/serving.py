"""The serving call: which model_version a frontend should serve to this user.

The user id travels in the ``X-User-Id`` header (GET) or the JSON body (POST), never in the
query string, where access logs and proxies keep it; a ``user_id`` query parameter is a 422.
It is hashed with PROSPECT_USER_ID_KEY (as feedback's user ids are) and bucketed with the
canary's version as salt (service.canary), so a user stays on one side of a canary and raising
the percentage only adds users. A frontend key (ingest) or a read key may ask.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.common import AUTHED, E422, error_response_doc, merge
from service.auth import KeyInfo, require
from service.errors import ApiError, JSONResp
from service.ingest import hash_user_id
from service.job_schemas import LINE_PATTERN
from service.registry_schemas import ServeIn, ServeOut

router = APIRouter(prefix="/v1/serve", tags=["serving"])
E404 = {404: error_response_doc("No such model line.")}
_ingest, _read = require("ingest"), require("read")


async def ingest_or_read(request: Request) -> KeyInfo:
    try:
        return await _ingest(request)
    except ApiError as exc:
        if exc.status != 403:
            raise
        return await _read(request)


Caller = Annotated[KeyInfo, Depends(ingest_or_read)]


def _no_query_user(request: Request) -> None:
    for name in request.query_params:
        if name.lower().replace("-", "_") in ("user_id", "user", "uid"):
            raise ApiError(422, "user_id_in_query",
                           f"{name}: never send the user id in the query string (access logs "
                           "keep it); use the X-User-Id header or the JSON body",
                           [{"field": name, "message": "not allowed in the query string"}])


def _answer(request: Request, line: str, user_id: str | None) -> dict[str, object]:
    state = request.app.state
    serving = state.serving.get(state.engine, state.settings, line)
    key = hash_user_id(user_id, state.settings.user_id_key) if user_id else None
    return serving.choose(key)


@router.get("", summary="The model version to serve to a user (user id in X-User-Id)",
            response_model=None,
            responses=merge({200: {"model": ServeOut, "description": "Serve this."}},
                            AUTHED, E404, E422))
async def serve_get(
    request: Request, _key: Caller,
    line: Annotated[str, Query(pattern=LINE_PATTERN)] = "default",
    x_user_id: Annotated[str | None, Header(min_length=1, max_length=256)] = None,
) -> Response:
    _no_query_user(request)
    return JSONResp(await run_in_threadpool(_answer, request, line, x_user_id))


@router.post("", summary="The model version to serve to a user (user id in the body)",
             response_model=None,
             responses=merge({200: {"model": ServeOut, "description": "Serve this."}},
                             AUTHED, E404, E422))
async def serve_post(
    request: Request, _key: Caller, body: ServeIn | None = None,
    x_user_id: Annotated[str | None, Header(min_length=1, max_length=256)] = None,
) -> Response:
    _no_query_user(request)
    body = body or ServeIn()
    return JSONResp(await run_in_threadpool(_answer, request, body.line,
                                            body.user_id or x_user_id))
