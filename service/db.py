"""Engine construction: the one place that knows how each backend must be configured.

Postgres gets connect and statement timeouts so an outage answers 503 instead of hanging;
SQLite (the embedded default, written by the API and workers from several processes) gets
WAL mode and a busy timeout on every connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings


def _ensure_sqlite_dir(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)


def make_engine(settings: Settings) -> Engine:
    """Engine for ``settings.database_url`` with the backend's safety settings applied."""
    url = settings.database_url
    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
        engine = create_engine(
            url,
            connect_args={
                "check_same_thread": False,
                "timeout": settings.sqlite_busy_timeout_ms / 1000,
            },
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout_s,
        )
        busy = settings.sqlite_busy_timeout_ms

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy)}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine

    if url.startswith("postgresql://") or url.startswith("postgres://"):
        # psycopg 3 is the driver this project depends on.
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return create_engine(
        url,
        connect_args={
            "connect_timeout": settings.db_connect_timeout_s,
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms} -c timezone=UTC",
            "application_name": settings.db_application_name,
        },
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        pool_recycle=1800,
        # No pool_pre_ping: it costs a round trip per request. After a database restart the
        # first request that meets a dead connection answers 503 and SQLAlchemy invalidates
        # the whole pool, so the next one reconnects.
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def newest_first(conn: Connection, table: Table, *, limit: int, before_id: int | None,
                 **equal: Any) -> list[dict[str, Any]]:
    """One keyset page of ``table``, newest id first, below ``before_id``: the listing routes'
    query. ``equal`` filters on columns; a None or empty value filters nothing."""
    stmt = select(table).order_by(table.c.id.desc()).limit(limit)
    for column, value in equal.items():
        if value is not None and value != "":
            stmt = stmt.where(table.c[column] == value)
    if before_id is not None:
        stmt = stmt.where(table.c.id < before_id)
    return [dict(r) for r in conn.execute(stmt).mappings()]


def dialect_insert(conn: Connection, table: Table) -> Any:
    """``INSERT`` for the connection's dialect (Postgres or SQLite), the one that has
    ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)
