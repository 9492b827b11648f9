"""Model lines: a named base model with its own chain of snapshots, jobs and checkpoints.

The `default` line is configured from PROSPECT_BASE_MODEL: it is created (or its base model
updated) the first time something needs it, so a deployment needs no set-up call.

Feedback events name no line, only the ``model_version`` a client echoes. A line's feedback
scope says which events are its data (its jobs, its retraining check, its gate's held-out
split): ``all`` (every event: a single-line deployment, whose clients may send their own
version strings) or ``served`` (only the versions this line served: ``<line>-base`` and its
checkpoints' ``<line>-ckpt-<id>``), so a second line's users never train this line's model.
The `default` line starts as ``all``, any other new line as ``served``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from service.errors import ApiError
from service.models import model_lines as ml
from service.settings import Settings

DEFAULT_LINE = "default"
FEEDBACK_SCOPES: tuple[str, ...] = ("all", "served")


def base_version(line: str) -> str:
    """The version a line serves before any promotion: its base model."""
    return f"{line}-base"


def checkpoint_version(line: str, checkpoint_id: int) -> str:
    """The version a checkpoint is served and echoed in feedback as."""
    return f"{line}-ckpt-{checkpoint_id}"


def initial_scope(name: str) -> str:
    """A new line's feedback scope: `default` keeps every event (single-line deployments,
    whose clients may name their own versions); another line takes only what it served, or
    it would train on the other lines' users."""
    return "all" if name == DEFAULT_LINE else "served"


def served_by(line: dict[str, object]) -> str | None:
    """The line name to scope its feedback to, or None when it reads every event."""
    return str(line["name"]) if line["feedback"] == "served" else None


def get_line(conn: Connection, name: str, settings: Settings) -> dict[str, object]:
    """The line's row; `default` is synced from settings. 404/409 when it cannot be used."""
    row = conn.execute(select(ml).where(ml.c.name == name)).mappings().first()
    if name == DEFAULT_LINE and settings.base_model:
        now = datetime.now(UTC)
        if row is None:
            try:
                with conn.begin_nested():
                    conn.execute(ml.insert().values(name=name, base_model=settings.base_model,
                                                    feedback=initial_scope(name),
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


def put_line(conn: Connection, name: str, base_model: str | None = None,
             feedback: str | None = None) -> dict[str, object]:
    """Create the line or change what is given. A new line needs a base model (422 naming
    it otherwise); its scope defaults to :func:`initial_scope`. An existing line keeps what is
    not given, so a PUT of the base model alone never resets a chosen scope."""
    if feedback is not None and feedback not in FEEDBACK_SCOPES:
        msg = f"must be one of {', '.join(FEEDBACK_SCOPES)}"
        raise ApiError(422, "invalid", f"feedback: {msg}", [{"field": "feedback", "message": msg}])
    now = datetime.now(UTC)
    values: dict[str, object] = {"updated_at": now}
    if base_model is not None:
        values["base_model"] = base_model
    if feedback is not None:
        values["feedback"] = feedback
    if not conn.execute(update(ml).where(ml.c.name == name).values(**values)).rowcount:
        if base_model is None:
            msg = "required to create a line"
            raise ApiError(422, "invalid", f"base_model: {msg}",
                           [{"field": "base_model", "message": msg}])
        try:
            with conn.begin_nested():
                conn.execute(ml.insert().values(name=name, base_model=base_model,
                                                feedback=feedback or initial_scope(name),
                                                created_at=now, updated_at=now))
        except IntegrityError:  # another process created it first: change it as asked
            conn.execute(update(ml).where(ml.c.name == name).values(**values))
    return dict(conn.execute(select(ml).where(ml.c.name == name)).mappings().one())


def list_lines(conn: Connection, settings: Settings) -> list[dict[str, object]]:
    if settings.base_model:
        get_line(conn, DEFAULT_LINE, settings)
    return [dict(r) for r in conn.execute(select(ml).order_by(ml.c.name)).mappings()]
