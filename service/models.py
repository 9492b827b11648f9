"""SQLAlchemy 2 tables. Schema changes go through Alembic (migrations/), never create_all."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
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


#: BIGINT on Postgres; INTEGER on SQLite so it is the rowid alias and autoincrements.
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

    __table_args__ = (
        Index("uq_feedback_events_event_id", "event_id", unique=True),
        Index("ix_feedback_events_occurred_at_id", "occurred_at", "id"),
        Index("ix_feedback_events_model_version", "model_version"),
        Index(
            "ix_feedback_events_replaces",
            "replaces",
            postgresql_where=text("replaces IS NOT NULL"),
            sqlite_where=text("replaces IS NOT NULL"),
        ),
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


feedback_events = FeedbackEvent.__table__
api_keys = ApiKey.__table__
