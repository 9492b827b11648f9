"""Data rights over HTTP: erase a user's feedback (admin), list erasures (admin), and the
lineage of deleted events: which jobs trained on them and which checkpoints carry them (read).

The user id travels in the JSON body (never in a URL, where access logs keep it) and is
hashed with PROSPECT_USER_ID_KEY exactly as at ingestion (service.ingest.hash_user_id), so the
raw id is never stored here either. An operator who only has the stored hash (from the
feedback listing) can send ``user_hash`` instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service import erasure
from service.api.common import AUTHED, E422, error_response_doc, id_cursor, id_page, merge
from service.auth import KeyInfo, require
from service.errors import ApiError, JSONResp
from service.ingest import hash_user_id
from service.job_schemas import LINE_PATTERN
from service.text import NoNul

router = APIRouter(tags=["data rights"])
Admin = Annotated[KeyInfo, Depends(require("admin"))]
Read = Annotated[KeyInfo, Depends(require("read"))]
E404 = {404: error_response_doc("No such erasure.")}

Verdict = Literal["trained", "may_have_trained", "held_out_only", "not_trained"]


class ErasureIn(BaseModel):
    """Exactly one of ``user_id`` (as the frontend sent it) or ``user_hash`` (as stored)."""

    model_config = ConfigDict(extra="forbid")

    #: Any length ingestion may have accepted (PROSPECT_MAX_ID_CHARS can be raised).
    user_id: str | None = Field(None, min_length=1, max_length=4096)
    user_hash: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    #: Free text for the audit trail, e.g. the ticket of the request. No personal data.
    reason: Annotated[str | None, Field(max_length=1000), NoNul] = None

    @model_validator(mode="after")
    def _one_subject(self) -> ErasureIn:
        if (self.user_id is None) == (self.user_hash is None):
            raise ValueError("send exactly one of user_id or user_hash")
        return self


class ErasureJobOut(BaseModel):
    job_id: int
    #: Deleted events in the job's training selection.
    n_trained: int
    #: Deleted events in the job's window but in the held-out split (never trained on).
    n_held_out: int
    #: False: events of the job's range had been deleted since it was created, so the count
    #: may be too high (never too low).
    exact: bool
    job_status: str
    job_attempt: int


class ErasureOut(BaseModel):
    id: int
    kind: Literal["user", "retention"]
    n_events: int
    min_event_id: int | None
    max_event_id: int | None
    cutoff: datetime | None
    actor: str
    reason: str | None
    created_at: datetime
    completed_at: datetime | None
    jobs: list[ErasureJobOut]


class ErasurePage(BaseModel):
    erasures: list[ErasureOut]
    next_cursor: str | None


class LineageJobOut(BaseModel):
    job_id: int
    line: str
    status: str
    #: The strongest over its erasures: trained (certain for at least one deleted event),
    #: may_have_trained, held_out_only, not_trained (it started after the deletion).
    verdict: Verdict
    n_trained: int
    n_held_out: int
    #: False: some counts may be too high (never too low), see ErasureJobOut.exact.
    exact: bool
    erasure_ids: list[int]
    first_erased_at: datetime
    last_erased_at: datetime
    checkpoints: list[int]


class LineageCheckpointOut(BaseModel):
    id: int
    line: str
    model_version: str
    stage: str
    job_id: int | None
    parent_id: int | None
    #: trained / may_have_trained: its job's data held deleted events; inherits: it started
    #: from such a checkpoint's weights (its π_ref came from ``via_checkpoint_id``).
    verdict: Literal["trained", "may_have_trained", "inherits"]
    via_checkpoint_id: int | None
    #: Still pending, candidate, canary or production: retire or roll it back.
    live: bool
    files_deleted: bool


class LineageOut(BaseModel):
    jobs: list[LineageJobOut]
    truncated: bool
    checkpoints: list[LineageCheckpointOut]
    live_checkpoints: list[int]


def _erasure_out(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in ErasureOut.model_fields if k != "jobs"}
    out["jobs"] = [{k: j[k] for k in ErasureJobOut.model_fields} for j in row["jobs"]]
    return out


@router.post("/v1/erasures", status_code=201,
             summary="Erase all feedback of one user; record which jobs had trained on it",
             response_model=None,
             responses=merge({201: {"model": ErasureOut, "description": "Erased."}},
                             AUTHED, E422))
async def erase(request: Request, body: ErasureIn, key: Admin) -> Response:
    state = request.app.state
    user_hash = body.user_hash or hash_user_id(body.user_id or "", state.settings.user_id_key)

    def run() -> Response:
        res = erasure.erase_user(state.engine, state.settings, user_hash,
                                 actor=f"key:{key.id}", key_id=key.id, reason=body.reason)
        with state.engine.connect() as conn:
            row = erasure.get_erasure(conn, int(res.erasure_id or 0))
        assert row is not None
        return JSONResp(_erasure_out(row), status_code=201,
                        headers={"Location": f"/v1/erasures/{row['id']}"})

    return await run_in_threadpool(run)


@router.get("/v1/erasures", summary="Erasures and retention runs, newest first",
            response_model=None,
            responses=merge({200: {"model": ErasurePage, "description": "A page."}},
                            AUTHED, E422))
async def list_(
    request: Request, _key: Admin,
    kind: Annotated[Literal["user", "retention"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    engine = request.app.state.engine
    before = id_cursor(cursor)

    def run() -> Response:
        with engine.connect() as conn:
            rows = erasure.list_erasures(conn, kind=kind, limit=limit + 1, before_id=before)
        rows, next_cursor = id_page(rows, limit)
        return JSONResp({"erasures": [_erasure_out(r) for r in rows], "next_cursor": next_cursor})

    return await run_in_threadpool(run)


@router.get("/v1/erasures/{erasure_id}", summary="One erasure and the jobs it touched",
            response_model=None,
            responses=merge({200: {"model": ErasureOut, "description": "The erasure."}},
                            AUTHED, E404, E422))
async def get(request: Request, erasure_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
              _key: Admin) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        with engine.connect() as conn:
            row = erasure.get_erasure(conn, erasure_id)
        if row is None:
            raise ApiError(404, "not_found", f"erasure {erasure_id} does not exist",
                           [{"field": "erasure_id", "message": "no such erasure"}])
        return JSONResp(_erasure_out(row))

    return await run_in_threadpool(run)


@router.get("/v1/lineage/erased",
            summary="Jobs and checkpoints trained on feedback that was erased since",
            response_model=None,
            responses=merge({200: {"model": LineageOut,
                                   "description": "Affected jobs and checkpoints."}},
                            AUTHED, E422))
async def lineage(
    request: Request, _key: Read,
    line: Annotated[str | None, Query(pattern=LINE_PATTERN)] = None,
    include_untrained: Annotated[bool, Query(
        description="Also list jobs whose window held deleted events that they did not "
                    "train on (held out, or deleted before the job started).")] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        with engine.connect() as conn:
            return JSONResp(erasure.erased_lineage(conn, line=line,
                                                   include_untrained=include_untrained,
                                                   limit=limit))

    return await run_in_threadpool(run)
