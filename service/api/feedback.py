"""Feedback: ingestion (single, batch, paired import) and the ops listing and export.

Bodies are parsed with orjson and each event validated on its own, so one bad item in a
batch is reported without dropping the good ones. Validation and the database round trip run
in the threadpool, one hop per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from service import observability
from service.api.common import (
    AUTHED,
    E400,
    E409,
    E413,
    E422,
    filters,
    merge,
)
from service.auth import KeyInfo, require
from service.errors import ApiError, JSONResp
from service.ingest import (
    Outcome,
    ingest_items,
    pair_event_ids,
    parse_json_body,
    reason_of,
    store_rows,
    to_row,
    validation_errors,
)
from service.queries import Filters, iter_training_examples, list_page
from service.schemas import BatchResult, FeedbackPage, PairsResult, SingleResult

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])

Ingest = Annotated[KeyInfo, Depends(require("ingest"))]
Read = Annotated[KeyInfo, Depends(require("read"))]


def _body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _models(state: Any, raw: bytes) -> dict[str, Any]:
    """The strict models when the body could carry a NUL character, else the fast ones.

    Valid JSON can only express NUL as the escape \\u0000 (raw control characters are
    rejected by the parser), so a body without that byte sequence needs no NUL checks."""
    return state.models if b"\\u0000" in raw else state.fast_models


@observability.count_request_rejections
def _single(state: Any, raw: bytes) -> Response:
    data = parse_json_body(raw)
    if not isinstance(data, dict):
        raise ApiError(422, "invalid", "body: must be a JSON object (one event)",
                       [{"field": "body", "message": "must be a JSON object"}])
    models = _models(state, raw)
    [out] = ingest_items([data], models["FeedbackIn"], state.settings, state.engine)
    observability.record_outcomes([out])
    if out.status == "rejected":
        raise ApiError(422, "invalid", out.reason or "invalid event", out.errors)
    if out.status == "conflict":
        raise ApiError(409, "conflict", f"event_id {out.event_id!r} is already stored with a "
                       "different payload; events are immutable (send a new event with "
                       "`replaces` to change a vote)", [{"field": "event_id",
                                                        "message": "conflicting payload"}])
    return JSONResp({"event_id": out.event_id, "status": out.status},
                    status_code=201 if out.status == "accepted" else 200)


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    counts = {"accepted": 0, "duplicate": 0, "conflict": 0, "rejected": 0}
    for o in outcomes:
        counts[o.status] += 1
    return {**counts, "results": [o.as_dict() for o in outcomes]}


def _events_of(data: Any, key: str, limit: int) -> list[Any]:
    items = data.get(key) if isinstance(data, dict) else data
    if not isinstance(items, list) or (isinstance(data, dict) and set(data) != {key}):
        raise ApiError(422, "invalid", f"body: must be {{\"{key}\": [...]}} or a JSON list",
                       [{"field": key, "message": "must be a list"}])
    if not items:
        raise ApiError(422, "invalid", f"{key}: must not be empty",
                       [{"field": key, "message": "must not be empty"}])
    if len(items) > limit:
        raise ApiError(422, "batch_too_large",
                       f"{key}: {len(items)} items; the maximum is {limit}",
                       [{"field": key, "message": f"at most {limit} items"}])
    return items


@observability.count_request_rejections
def _batch(state: Any, raw: bytes) -> Response:
    items = _events_of(parse_json_body(raw), "events", state.settings.max_batch_items)
    models = _models(state, raw)
    outcomes = ingest_items(items, models["FeedbackIn"], state.settings, state.engine)
    observability.record_outcomes(outcomes)
    return JSONResp(_summary(outcomes), status_code=207)


@observability.count_request_rejections
def _pairs(state: Any, raw: bytes) -> Response:
    from datetime import UTC, datetime

    settings = state.settings
    items = _events_of(parse_json_body(raw), "pairs", settings.max_batch_items // 2 or 1)
    models = _models(state, raw)
    model = models["PairIn"]
    event_model = models["FeedbackIn"]
    now = datetime.now(UTC)
    results: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    slots: list[tuple[dict[str, Any], str]] = []
    for i, raw_pair in enumerate(items):
        try:
            if not isinstance(raw_pair, dict):
                raise ValueError
            pair = model.model_validate(raw_pair)
        except (ValidationError, ValueError) as exc:
            errs = (validation_errors(exc) if isinstance(exc, ValidationError)
                    else [{"field": "pair", "message": "must be a JSON object"}])
            results.append({"index": i, "status": "rejected", "reason": reason_of(errs),
                            "errors": errs})
            continue
        res: dict[str, Any] = {"index": i, "status": "stored"}
        for eid, completion, label, slot in zip(
            pair_event_ids(pair), (pair.chosen, pair.rejected), (True, False),
            ("chosen", "rejected"), strict=True,
        ):
            event = event_model.model_construct(
                event_id=eid, prompt=pair.prompt, completion=completion, label=label,
                model_version=pair.model_version, user_id=None, session_id=None,
                source=pair.source, environment=None, trace_id=None, request_id=None,
                replaces=None, correction=None, comment=None, metadata=pair.metadata,
                occurred_at=pair.occurred_at,
            )
            rows.append(to_row(event, settings, now))
            res[slot] = {"index": i, "event_id": eid, "status": "accepted"}
            slots.append((res, slot))
        results.append(res)
    counts = {"accepted": 0, "duplicate": 0, "conflict": 0}
    for (res, slot), status in zip(slots, store_rows(state.engine, rows), strict=True):
        res[slot]["status"] = status
        counts[status] += 1
    observability.record_status_counts(
        counts, [r["errors"] for r in results if r["status"] == "rejected"])
    return JSONResp({
        "events_accepted": counts["accepted"], "events_duplicate": counts["duplicate"],
        "events_conflict": counts["conflict"],
        "pairs_rejected": sum(r["status"] == "rejected" for r in results),
        "results": results,
    }, status_code=207)


@router.post(
    "",
    summary="Store one feedback event",
    status_code=201,
    response_model=None,
    responses=merge(
        {201: {"model": SingleResult, "description": "Stored."},
         200: {"model": SingleResult, "description": "Duplicate: already stored, same payload."}},
        E400, AUTHED, E409, E413, E422,
    ),
    openapi_extra=None,
)
async def post_feedback(request: Request, _key: Ingest) -> Response:
    raw = await request.body()
    return await run_in_threadpool(_single, request.app.state, raw)


@router.post(
    "/batch",
    summary="Store up to PROSPECT_MAX_BATCH_ITEMS events; per-item results",
    status_code=207,
    response_model=None,
    responses=merge(
        {207: {"model": BatchResult,
               "description": "Per item: accepted, duplicate, conflict or rejected."}},
        E400, AUTHED, E413, E422,
    ),
)
async def post_batch(request: Request, _key: Ingest) -> Response:
    raw = await request.body()
    return await run_in_threadpool(_batch, request.app.state, raw)


@router.post(
    "/import-pairs",
    summary="Import paired preferences as one desirable + one undesirable event each",
    status_code=207,
    response_model=None,
    responses=merge(
        {207: {"model": PairsResult, "description": "Per pair results; re-import is idempotent."}},
        E400, AUTHED, E413, E422,
    ),
)
async def import_pairs(request: Request, _key: Ingest) -> Response:
    raw = await request.body()
    return await run_in_threadpool(_pairs, request.app.state, raw)


@router.get(
    "",
    summary="List events, newest first (keyset pagination)",
    response_model=None,
    responses=merge({200: {"model": FeedbackPage, "description": "A page of events."}},
                    AUTHED, E422),
)
async def list_feedback(
    request: Request,
    _key: Read,
    f: Annotated[Filters, Depends(filters)],
    limit: Annotated[int | None, Query(ge=1, description="Page size.")] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    state = request.app.state
    size = min(limit or state.settings.default_page_size, state.settings.max_page_size)

    def run() -> Response:
        with state.engine.connect() as conn:
            items, nxt = list_page(conn, f, size, cursor)
        return JSONResp({"items": items, "next_cursor": nxt})

    return await run_in_threadpool(run)


@router.get(
    "/export",
    summary="Stream the window as JSONL for TRL's KTOTrainer: {prompt, completion, label}",
    response_class=StreamingResponse,
    responses=merge(
        {200: {"content": {"application/x-ndjson": {}},
               "description": "One JSON object per line: prompt, completion, label (bool)."}},
        AUTHED, E422,
    ),
)
async def export_feedback(
    request: Request,
    _key: Read,
    f: Annotated[Filters, Depends(filters)],
    corrections: Annotated[bool, Query(
        description="Also emit each stored correction as a desirable completion.")] = False,
) -> StreamingResponse:
    engine = request.app.state.engine

    def open_rows() -> Any:
        # The query starts before the response does, so an outage is still a clean 503.
        conn = engine.connect()
        try:
            rows = iter_training_examples(conn, f, corrections)
            first = next(rows, None)
            return conn, first, rows
        except Exception:
            conn.close()
            raise

    conn, first, rows = await run_in_threadpool(open_rows)

    def lines() -> Iterator[bytes]:
        try:
            if first is not None:
                yield orjson.dumps(first) + b"\n"
            for row in rows:
                yield orjson.dumps(row) + b"\n"
        finally:
            conn.close()

    return StreamingResponse(lines(), media_type="application/x-ndjson")
