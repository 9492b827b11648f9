"""The registry API contract: promotion, rollback, serving, storage."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.job_schemas import LINE_PATTERN
from service.text import NoNul

Stage = Literal["pending", "candidate", "canary", "production", "retired", "rejected"]


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal["canary", "production"]
    #: Share of users (by a stable hash of the user id) served the canary.
    percent: float | None = Field(None, gt=0.0, le=100.0, validate_default=True)
    reason: Annotated[str | None, Field(max_length=1000), NoNul] = None

    @field_validator("percent")
    @classmethod
    def _percent(cls, v: float | None, info: ValidationInfo) -> float | None:
        stage = info.data.get("stage")
        if stage == "canary" and v is None:
            raise ValueError("a canary needs a percentage in (0, 100]")
        if stage == "production" and v is not None:
            raise ValueError("only a canary takes a percentage")
        return v


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    line: str = Field("default", pattern=LINE_PATTERN)
    #: production: the previous production checkpoint (or the base model) serves again;
    #: canary: the canary stops and its users go back to production.
    target: Literal["production", "canary"] = "production"
    reason: Annotated[str | None, Field(max_length=1000), NoNul] = None


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Recorded on the checkpoint, in the audit trail and in the webhook.
    reason: Annotated[str | None, Field(max_length=1000), NoNul] = None


class ServeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    line: str = Field("default", pattern=LINE_PATTERN)
    #: The end user; hashed (HMAC) before bucketing, never stored. Without one the user gets
    #: production (an anonymous user cannot stay on one side of a canary).
    user_id: str | None = Field(None, min_length=1, max_length=256)


class ServeOut(BaseModel):
    line: str
    #: Serve this model and echo this string as the feedback's model_version.
    model_version: str
    arm: Literal["production", "canary", "base"]
    checkpoint_id: int | None
    #: The Hugging Face folder to load (from_pretrained) for this version.
    model_path: str
    canary_percent: float


class CleanupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = True


class CheckpointOut(BaseModel):
    id: int
    line: str
    model_version: str
    stage: Stage
    canary_percent: float | None
    job_id: int | None
    reference_snapshot_id: int | None
    parent_id: int | None
    #: The version this checkpoint was trained from (π_ref): a checkpoint or "<line>-base".
    parent_version: str
    base_model: str
    artifact_path: str | None
    adapter_path: str | None
    format: Literal["full", "lora"]
    manifest_sha256: str | None
    size_bytes: int | None
    metrics: dict[str, Any] | None
    reason: str | None
    previous_production_id: int | None
    next_reference_id: int | None
    gate_attempts: int
    gate_error: str | None
    created_at: datetime
    stage_changed_at: datetime
    evaluated_at: datetime | None
    files_deleted_at: datetime | None


class CheckpointPage(BaseModel):
    checkpoints: list[CheckpointOut]
    next_cursor: str | None


class RolloutEventOut(BaseModel):
    id: int
    line: str
    checkpoint_id: int | None
    action: str
    from_stage: str | None
    to_stage: str | None
    canary_percent: float | None
    actor: str
    key_id: int | None
    reason: str | None
    details: dict[str, Any] | None
    created_at: datetime


class RolloutEventPage(BaseModel):
    """GET /v1/rollout-events: a page of events and the cursor of the next one."""

    events: list[RolloutEventOut]
    next_cursor: str | None


class RejectOut(BaseModel):
    line: str
    #: The checkpoint, now ``rejected``.
    checkpoint: CheckpointOut
    previous_stage: Literal["pending", "candidate"]
    #: An evaluation attempt was running: its worker stops it within seconds and its verdict
    #: is not written.
    stopping_evaluation: bool


class ChangeOut(BaseModel):
    line: str
    #: What serves now (production) or what changed (canary).
    checkpoint: CheckpointOut | None
    #: What stopped serving: the retired or rolled-back checkpoint.
    previous: CheckpointOut | None
    #: The production version after the change ("<line>-base" when no checkpoint).
    serving: str
    #: A π_ref snapshot of the new production model, taken by a worker.
    reference_snapshot_id: int | None
    enqueued: bool
