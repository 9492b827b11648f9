"""The jobs and references API contract: what a training request may ask for.

Bounds are generous but finite: a typo (lr=5, beta=0) is a 422 naming the field, not a
diverged run an hour later.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.text import NoNul

LINE_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


class JobParams(BaseModel):
    """Hyperparameters; defaults follow the paper review (β = 0.1, lr 5e-6 for full weights)."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, le=10)
    learning_rate: float = Field(5e-6, gt=0, le=1)
    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    microbatch_size: int = Field(8, ge=1, le=4096)
    grad_accum_steps: int = Field(1, ge=1, le=4096)
    max_length: int = Field(1024, ge=8, le=1_048_576)
    max_prompt_length: int | None = Field(None, ge=1, le=1_048_576)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    lora: bool = False
    lora_r: int = Field(16, ge=1, le=1024)
    #: Balancer target λD·nD/(λU·nU); default: PROSPECT_TARGET_RATIO.
    target_ratio: float | None = Field(None, ge=1.0, le=1.5)
    #: Explicit weights, both or neither; they override the balancer (still refused on an
    #: empty class).
    lambda_d: float | None = Field(None, gt=0, le=100)
    lambda_u: float | None = Field(None, gt=0, le=100)
    use_reference_point: bool = True
    gradient_checkpointing: bool = False
    #: Checkpoint every N steps (what a resumed attempt restarts from); default: about 20
    #: checkpoints per run.
    save_every_steps: int | None = Field(None, ge=1, le=10_000_000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    #: Replay each optimizer step as one CUDA graph where batch shapes repeat. "auto": where the
    #: worker has CUDA and packing, for full fine-tunes, on shapes that make half the steps
    #: (fixed lengths, or pack_bucket); true: also for LoRA and rarer shapes (logged and ignored
    #: where it cannot run); false: never.
    cuda_graphs: bool | Literal["auto"] = "auto"
    #: Pad packed batches to multiples of this many tokens (0: off), so that chat-length data
    #: repeats a few shapes that cuda_graphs can replay (e.g. 1024); a multiple of 16.
    pack_bucket: int = Field(0, ge=0, le=1_048_576, multiple_of=16)
    #: GiB the LM head may hold from forward to backward to skip recomputing its logits
    #: (rows × vocabulary in bf16); 0 when memory is tight; default: the worker's (4).
    lm_head_grad_cache_gib: float | None = Field(None, ge=0, le=1024)

    @model_validator(mode="after")
    def _lambdas(self) -> JobParams:
        if (self.lambda_d is None) != (self.lambda_u is None):
            missing = "lambda_u" if self.lambda_u is None else "lambda_d"
            raise ValueError(f"{missing}: give both lambda_d and lambda_u, or neither")
        if self.lambda_d is not None and self.target_ratio is not None:
            raise ValueError("target_ratio: not with explicit lambda_d/lambda_u")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length: must be below max_length")
        return self


class JobFilters(BaseModel):
    """Which feedback the job trains on (besides the held-out split and the per-user cap)."""

    model_config = ConfigDict(extra="forbid")

    since: datetime | None = None
    until: datetime | None = None
    model_version: Annotated[str | None, Field(max_length=256), NoNul] = None
    source: Annotated[str | None, Field(max_length=256), NoNul] = None
    #: Add each stored user correction as a desirable completion for its prompt.
    corrections: bool = False
    #: Only events that arrived after the line's last successful job (scheduled jobs do this).
    new_data_only: bool = False

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return None
        try:
            return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00+05:00 (found by fuzzing): not a 500
            raise ValueError("must lie between the years 1 and 9999 in UTC") from None

    @model_validator(mode="after")
    def _window(self) -> JobFilters:
        if self.since and self.until and self.since >= self.until:
            raise ValueError("until: must be after since")
        return self

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    line: str = Field("default", pattern=LINE_PATTERN)
    params: JobParams = Field(default_factory=JobParams)
    filters: JobFilters = Field(default_factory=JobFilters)


class JobOut(BaseModel):
    id: int
    line: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    trigger: str
    requested_by: int | None
    params: dict[str, Any]
    filters: dict[str, Any]
    #: The frozen data: events with min_event_id < id <= max_event_id in the window.
    min_event_id: int
    max_event_id: int
    n_desirable: int
    n_undesirable: int
    n_users: int
    lambda_d: float
    lambda_u: float
    data: dict[str, Any]
    reference_snapshot_id: int | None
    step: int
    total_steps: int | None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    worker_host: str | None
    heartbeat_at: datetime | None
    output_dir: str | None
    result: dict[str, Any] | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    #: Times an operator retried it (POST /v1/jobs/{id}/retry), and how each earlier run
    #: ended: {retry, status, error, attempt, step, finished_at, retried_at, retried_by}.
    retries: int
    retry_history: list[dict[str, Any]] | None


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None


class MetricOut(BaseModel):
    step: int
    attempt: int
    metrics: dict[str, Any]
    created_at: datetime


class MetricsPage(BaseModel):
    job_id: int
    metrics: list[MetricOut]
    next_after_step: int | None


class SnapshotIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    line: str = Field("default", pattern=LINE_PATTERN)


class SnapshotOut(BaseModel):
    id: int
    line: str
    #: deleted: retention removed its files (the row stays for lineage).
    status: Literal["pending", "ready", "unchanged", "failed", "deleted"]
    source: str
    content_hash: str | None
    path: str | None
    size_bytes: int | None
    same_as_id: int | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class LineIn(BaseModel):
    """A new line needs ``base_model``; a change names only what changes."""

    model_config = ConfigDict(extra="forbid")

    base_model: Annotated[str | None, Field(min_length=1, max_length=1024), NoNul] = None
    #: Which feedback is the line's data: "all" events, or only those whose model_version
    #: this line served ("<line>-base", its checkpoints' "<line>-ckpt-<id>"). Default for a
    #: new line: "served" ("all" for `default`); an existing line keeps its scope.
    feedback: Literal["all", "served"] | None = None


class LineOut(BaseModel):
    name: str
    base_model: str
    feedback: Literal["all", "served"]
    created_at: datetime
    updated_at: datetime
