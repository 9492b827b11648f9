"""Model lines: a named base model with its own chain of snapshots, jobs and checkpoints.

The `default` line is configured from PROSPECT_BASE_MODEL: it is created (or its base model
updated) the first time something needs it, so a deployment needs no set-up call.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from service.errors import ApiError
from service.models import model_lines as ml
from service.settings import Settings

DEFAULT_LINE = "default"


def get_line(conn: Connection, name: str, settings: Settings) -> dict[str, object]:
    """The line's row; `default` is synced from settings. 404/409 when it cannot be used."""
    row = conn.execute(select(ml).where(ml.c.name == name)).mappings().first()
    if name == DEFAULT_LINE and settings.base_model:
        now = datetime.now(UTC)
        if row is None:
            try:
                with conn.begin_nested():
                    conn.execute(ml.insert().values(name=name, base_model=settings.base_model,
                                                    created_at=now, updated_at=now))
            except IntegrityError:  # another process created it first
                pass
        elif row["base_model"] != settings.base_model:
            conn.execute(update(ml).where(ml.c.name == name)
                         .values(base_model=settings.base_model, updated_at=now))
        row = conn.execute(select(ml).where(ml.c.name == name)).mappings().one()
    if row is None:
        if name == DEFAULT_LINE:
            raise ApiError(409, "no_base_model",
                           "line: the default line has no base model; set PROSPECT_BASE_MODEL",
                           [{"field": "line", "message": "PROSPECT_BASE_MODEL is not set"}])
        raise ApiError(404, "unknown_line", f"line: no model line named {name!r}",
                       [{"field": "line", "message": "unknown model line"}])
    return dict(row)


def put_line(conn: Connection, name: str, base_model: str) -> dict[str, object]:
    now = datetime.now(UTC)
    res = conn.execute(update(ml).where(ml.c.name == name)
                       .values(base_model=base_model, updated_at=now))
    if not res.rowcount:
        try:
            with conn.begin_nested():
                conn.execute(ml.insert().values(name=name, base_model=base_model,
                                                created_at=now, updated_at=now))
        except IntegrityError:
            conn.execute(update(ml).where(ml.c.name == name)
                         .values(base_model=base_model, updated_at=now))
    return dict(conn.execute(select(ml).where(ml.c.name == name)).mappings().one())


def list_lines(conn: Connection, settings: Settings) -> list[dict[str, object]]:
    if settings.base_model:
        get_line(conn, DEFAULT_LINE, settings)
    return [dict(r) for r in conn.execute(select(ml).order_by(ml.c.name)).mappings()]
