"""SQLAlchemy 2 tables. Schema changes go through Alembic (migrations/), never create_all."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends.

    SQLite has no timezone type: values are stored as naive UTC strings (so they still sort
    and compare correctly) and come back aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: BIGINT on Postgres; INTEGER on SQLite so it is the rowid alias and autoincrements (reusing
#: the ids of deleted newest rows unless the table sets ``sqlite_autoincrement``).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class FeedbackEvent(Base):
    """One thumbs-up/down on one model answer, stored exactly once per ``event_id``."""

    __tablename__ = "feedback_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    #: The client's idempotency key.
    event_id: Mapped[str] = mapped_column(String(256), nullable=False)
    #: sha256 of the canonical stored payload: tells a retry (same hash) from a conflict.
    payload_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    #: A string, or a list of chat messages {role, content}.
    prompt: Mapped[Any] = mapped_column(JSON, nullable=False)
    completion: Mapped[str] = mapped_column(Text, nullable=False)
    desirable: Mapped[bool] = mapped_column(Boolean, nullable=False)
    #: The checkpoint that produced the completion; the registry will own these names.
    model_version: Mapped[str] = mapped_column(String(256), nullable=False)
    #: HMAC-SHA256 of the client's user id, keyed by settings.user_id_key.
    user_hash: Mapped[str | None] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(256))
    source: Mapped[str | None] = mapped_column(String(256))
    environment: Mapped[str | None] = mapped_column(String(256))
    trace_id: Mapped[str | None] = mapped_column(String(256))
    request_id: Mapped[str | None] = mapped_column(String(256))
    #: The event_id of an earlier vote on the same answer that this one supersedes.
    replaces: Mapped[str | None] = mapped_column(String(256))
    correction: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: 0..9999 from sha256(event_id): decides the held-out split (see service.selection),
    #: so the split never depends on arrival order and a fraction change needs no rewrite.
    split_bucket: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default="0")

    __table_args__ = (
        Index("uq_feedback_events_event_id", "event_id", unique=True),
        Index("ix_feedback_events_occurred_at_id", "occurred_at", "id"),
        Index("ix_feedback_events_model_version", "model_version"),
        # Erasure of one user's events (service/erasure.py, migration 0004).
        Index("ix_feedback_events_user_hash", "user_hash"),
        Index(
            "ix_feedback_events_replaces",
            "replaces",
            postgresql_where=text("replaces IS NOT NULL"),
            sqlite_where=text("replaces IS NOT NULL"),
        ),
        # SQLite: never reuse the id of a deleted event (jobs freeze id ranges; migration 0010).
        {"sqlite_autoincrement": True},
    )


class ApiKey(Base):
    """An API key, stored only as the SHA-256 digest of the secret."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(256))
    #: The first characters of the key, shown by `prospect keys list` to recognise it.
    display_prefix: Mapped[str] = mapped_column(String(32), nullable=False)
    digest: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    #: Comma-separated scopes: ingest, read, admin.
    scopes: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


#: Job states. "queued" and "running" are active: at most one active job per model line.
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_JOB_STATUSES = ("queued", "running")


class ModelLine(Base):
    """A named base model with its own chain of reference snapshots, jobs and checkpoints."""

    __tablename__ = "model_lines"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Hugging Face model id or local folder: the line's production model until the registry
    #: promotes a checkpoint.
    base_model: Mapped[str] = mapped_column(String(1024), nullable=False)
    #: Which feedback events are the line's data (service.lines): "all", or "served" (only
    #: the model versions this line served). Rows that predate the column are "all".
    feedback: Mapped[str] = mapped_column(String(16), nullable=False, server_default="all")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class ReferenceSnapshot(Base):
    """A frozen, hashed copy of a line's production model, used as π_ref by jobs."""

    __tablename__ = "reference_snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"), nullable=False)
    #: pending -> ready | unchanged (same content as ``same_as_id``) | failed
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    #: What was frozen: a model id or folder (later: a checkpoint's artifact path).
    source: Mapped[str] = mapped_column(String(1024), nullable=False)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str | None] = mapped_column(String(1024))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    same_as_id: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Set by the worker copying it, every heartbeat interval: a duplicate delivery of the task
    #: (the gate sweep re-sends slow ones) leaves a snapshot alone while this is recent.
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The delivery holding the snapshot: only it may complete or fail the row.
    claim_token: Mapped[str | None] = mapped_column(String(32))
    #: Deliveries that claimed it: the gate sweep re-sends a snapshot whose worker stopped
    #: heartbeating, and fails it after PROSPECT_SNAPSHOT_MAX_ATTEMPTS instead of forever.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")

    __table_args__ = (Index("ix_reference_snapshots_line_id", "line", "id"),)


class TrainingJob(Base):
    """One KTO run. Postgres is the source of truth for its state; the broker only delivers.

    Every write by a running attempt is fenced by ``attempt_token``: a claim sets a new token,
    and an update that does not match it changes nothing, so a stalled or re-queued attempt can
    never overwrite a newer one.
    """

    __tablename__ = "training_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    #: api | schedule
    trigger: Mapped[str] = mapped_column(String(16), nullable=False)
    requested_by: Mapped[int | None] = mapped_column(Integer)
    #: Hyperparameters (β, lr, steps, batch, lengths, LoRA, λ policy), as validated by the API.
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    #: Window and filters: since, until, model_version, source, corrections; and the line's
    #: feedback scope then ("feedback"; with "served", "max_checkpoint_id").
    filters: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    #: The frozen event-id range (min_event_id, max_event_id], the cap and holdout used.
    min_event_id: Mapped[int] = mapped_column(BigId, nullable=False)
    max_event_id: Mapped[int] = mapped_column(BigId, nullable=False)
    n_desirable: Mapped[int] = mapped_column(Integer, nullable=False)
    n_undesirable: Mapped[int] = mapped_column(Integer, nullable=False)
    n_users: Mapped[int] = mapped_column(Integer, nullable=False)
    lambda_d: Mapped[float] = mapped_column(Float, nullable=False)
    lambda_u: Mapped[float] = mapped_column(Float, nullable=False)
    #: Details of the selection (cap, dropped by cap, holdout fraction, sha256 of the ids).
    data: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    reference_snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("reference_snapshots.id", ondelete="RESTRICT"))
    step: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    total_steps: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    attempt_token: Mapped[str | None] = mapped_column(String(64))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False,
                                                   server_default=text("false"))
    worker_host: Mapped[str | None] = mapped_column(String(256))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    output_dir: Mapped[str | None] = mapped_column(String(1024))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Times an operator re-ran the finished (failed or cancelled) job (service/job_retry.py).
    retries: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    #: One entry per retry, oldest first: how the run before it ended ({retry, status, error,
    #: attempt, step, finished_at, retried_at, retried_by}); the row's own columns are reset.
    retry_history: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    __table_args__ = (
        # The "one job per line at a time" rule lives in the database, so it holds across any
        # number of API and beat processes.
        Index("uq_training_jobs_active_line", "line", unique=True,
              postgresql_where=text("status IN ('queued', 'running')"),
              sqlite_where=text("status IN ('queued', 'running')")),
        Index("ix_training_jobs_status", "status"),
    )


class JobMetric(Base):
    """One optimizer step's metrics, under the engine's metric names."""

    __tablename__ = "job_metrics"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


# ---- registry: checkpoints, their rollout audit trail, and the webhook outbox

#: Checkpoint stages. ``pending`` waits for the evaluation gate; ``candidate`` passed it;
#: ``canary`` serves a percentage of users; ``production`` serves everyone else (at most one
#: per line, and at most one canary: partial unique indexes); ``retired`` was production
#: before a newer one; ``rejected`` failed the gate or was rolled back.
CHECKPOINT_STAGES = ("pending", "candidate", "canary", "production", "retired", "rejected")
#: Stages whose files are in use and never removed by retention.
LIVE_STAGES = ("pending", "candidate", "canary", "production")


class Checkpoint(Base):
    """A job's trained model, registered with its lineage, evaluation and rollout stage."""

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"), nullable=False)
    #: The string frontends echo in feedback: "<line>-ckpt-<id>" (see service.registry).
    model_version: Mapped[str] = mapped_column(String(256), nullable=False)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("training_jobs.id", ondelete="RESTRICT"))
    #: π_ref the job trained against (and the weights it started from).
    reference_snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("reference_snapshots.id", ondelete="RESTRICT"))
    #: The checkpoint that π_ref was taken from; NULL: the line's base model.
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"))
    base_model: Mapped[str] = mapped_column(String(1024), nullable=False)
    #: Hugging Face folder (full weights, or the merged copy of a LoRA run).
    artifact_path: Mapped[str | None] = mapped_column(String(1024))
    adapter_path: Mapped[str | None] = mapped_column(String(1024))
    #: full | lora
    format: Mapped[str] = mapped_column(String(16), nullable=False)
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    stage: Mapped[str] = mapped_column(String(16), nullable=False)
    canary_percent: Mapped[float | None] = mapped_column(Float)
    #: The gate's evaluation report and per-check verdicts.
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Why it was rejected or rolled back.
    reason: Mapped[str | None] = mapped_column(Text)
    #: Production before this one became production: where a rollback goes.
    previous_production_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"))
    #: The π_ref snapshot requested when it became production (the line's next reference).
    next_reference_id: Mapped[int | None] = mapped_column(
        ForeignKey("reference_snapshots.id", ondelete="SET NULL"))
    #: The gate's own bookkeeping: attempts, the running attempt's token and heartbeat.
    gate_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    gate_token: Mapped[str | None] = mapped_column(String(64))
    gate_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    gate_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    gate_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    stage_changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    evaluated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    files_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("uq_checkpoints_model_version", "model_version", unique=True),
        Index("uq_checkpoints_job_id", "job_id", unique=True),
        Index("ix_checkpoints_line_stage", "line", "stage"),
        # Two production (or two canary) checkpoints of one line are impossible, whatever
        # process writes: the database refuses the second.
        Index("uq_checkpoints_production_line", "line", unique=True,
              postgresql_where=text("stage = 'production'"),
              sqlite_where=text("stage = 'production'")),
        Index("uq_checkpoints_canary_line", "line", unique=True,
              postgresql_where=text("stage = 'canary'"),
              sqlite_where=text("stage = 'canary'")),
    )


class RolloutEvent(Base):
    """Append-only audit of every stage change (a trigger refuses UPDATE and DELETE)."""

    __tablename__ = "rollout_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    line: Mapped[str] = mapped_column(String(64), nullable=False)
    checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"))
    #: registered | passed | rejected | canary | canary_percent | production | retired |
    #: rollback | guard_inconclusive | files_deleted
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    from_stage: Mapped[str | None] = mapped_column(String(16))
    to_stage: Mapped[str | None] = mapped_column(String(16))
    canary_percent: Mapped[float | None] = mapped_column(Float)
    #: "key:<id>" (an API key), "gate", "guard", "retention" or "system".
    actor: Mapped[str] = mapped_column(String(64), nullable=False)
    key_id: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)

    __table_args__ = (
        Index("ix_rollout_events_line_id", "line", "id"),
        Index("ix_rollout_events_checkpoint_id", "checkpoint_id", "id"),
    )


class Notification(Base):
    """Webhook outbox: written in the same transaction as the change it reports, delivered
    with retries by a beat task, so a down receiver or broker loses nothing."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    #: One notification per fact (e.g. "job_failed:12"): a re-run sweep adds no duplicate.
    dedup_key: Mapped[str] = mapped_column(String(256), nullable=False)
    event: Mapped[str] = mapped_column(String(32), nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    #: pending | sent | failed
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("uq_notifications_dedup_key", "dedup_key", unique=True),
        Index("ix_notifications_status_next", "status", "next_attempt_at"),
    )


# ---- data rights: erasures and what each one touched (service/erasure.py)

class Erasure(Base):
    """One deletion of feedback events: a user's erasure or a retention run.

    Kept after the events are gone, so "which checkpoints learned from deleted data" stays
    answerable (``erasure_jobs``). It holds no content: counts, the deleted id range, who
    asked, and for a user erasure the keyed user hash (the same pseudonym the events had), so
    a repeated request can be recognised.
    """

    __tablename__ = "erasures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: user | retention
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    user_hash: Mapped[str | None] = mapped_column(String(64))
    #: retention: events with occurred_at before this were deleted.
    cutoff: Mapped[datetime | None] = mapped_column(UTCDateTime())
    n_events: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    #: The smallest and largest feedback_events.id deleted (NULL when nothing was).
    min_event_id: Mapped[int | None] = mapped_column(BigId)
    max_event_id: Mapped[int | None] = mapped_column(BigId)
    #: "key:<id>" (an API key), "retention" or "cli".
    actor: Mapped[str] = mapped_column(String(64), nullable=False)
    key_id: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_erasures_user_hash", "user_hash"),)


class ErasedEventId(Base):
    """An event id a user erasure deleted, as a SHA-256 hash (``service.ingest.event_id_hash``).

    Ingestion is idempotent on event_id, and the idempotency key leaves with the row: without
    this, a client retrying an old event after the erasure would store the erased feedback
    again. A retry of an erased id is answered as a duplicate (received before) and not stored.
    Only user erasures write these; retention deletes late copies of old events on its next run.
    """

    __tablename__ = "erased_event_ids"

    event_id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    erasure_id: Mapped[int] = mapped_column(
        ForeignKey("erasures.id", ondelete="CASCADE"), nullable=False)


class ErasureJob(Base):
    """A job whose frozen selection contained events that an erasure deleted."""

    __tablename__ = "erasure_jobs"

    erasure_id: Mapped[int] = mapped_column(
        ForeignKey("erasures.id", ondelete="CASCADE"), primary_key=True)
    job_id: Mapped[int] = mapped_column(
        ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True)
    #: Deleted events in the job's training selection (window, filters, latest vote, train
    #: split, per-user cap), reconstructed from the rows present at erasure time.
    n_trained: Mapped[int] = mapped_column(Integer, nullable=False)
    #: Deleted events in the job's window but in the held-out split: scored by the gate,
    #: never trained on.
    n_held_out: Mapped[int] = mapped_column(Integer, nullable=False)
    #: False when the reconstruction may over-count (events of the job's range were deleted
    #: after the job was created, so the per-user cap or a replacement may have differed).
    exact: Mapped[bool] = mapped_column(Boolean, nullable=False)
    #: The job's status and attempt when the events were deleted: a queued job that never
    #: started reads its data when it starts, so it never sees them.
    job_status: Mapped[str] = mapped_column(String(16), nullable=False)
    job_attempt: Mapped[int] = mapped_column(Integer, nullable=False)

    __table_args__ = (Index("ix_erasure_jobs_job_id", "job_id"),)

feedback_events = FeedbackEvent.__table__
api_keys = ApiKey.__table__
model_lines = ModelLine.__table__
reference_snapshots = ReferenceSnapshot.__table__
training_jobs = TrainingJob.__table__
job_metrics = JobMetric.__table__
checkpoints = Checkpoint.__table__
rollout_events = RolloutEvent.__table__
notifications = Notification.__table__
erasures = Erasure.__table__
erasure_jobs = ErasureJob.__table__
erased_event_ids = ErasedEventId.__table__
