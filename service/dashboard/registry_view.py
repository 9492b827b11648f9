"""What the dashboard shows of the checkpoint registry, and the rollout actions it offers.

The registry (checkpoints, rollout_events) is built beside the dashboard; this module reads
its tables with plain SQL over the columns the migration defines and degrades to an
explanatory message when the tables are not there (an older database), so the rest of the
dashboard never depends on it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from service.dashboard import data

ACTIONS = ("promote", "rollback", "reject")
_MISSING = ("The checkpoint registry has no tables in this database yet "
            "(run `prospect db upgrade`).")

_CKPT_COLS = ("c.id, c.line, c.model_version, c.job_id, c.reference_snapshot_id, c.parent_id, "
              "c.base_model, c.format, c.stage, c.canary_percent, c.metrics, c.reason, "
              "c.previous_production_id, c.created_at, c.stage_changed_at, c.evaluated_at, "
              "j.min_event_id, j.max_event_id, j.n_desirable, j.n_undesirable, j.filters")


def available(conn: Connection) -> bool:
    return data.has_table(conn, "checkpoints") and data.has_table(conn, "rollout_events")


def _dt(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v.replace(" ", "T")
    return v.isoformat() if isinstance(v, datetime) else str(v)


def _json(v: Any) -> Any:
    if isinstance(v, str):
        import orjson

        try:
            return orjson.loads(v)
        except orjson.JSONDecodeError:
            return v
    return v


def _ckpt(r: Any) -> dict[str, Any]:
    m = dict(r._mapping)
    for k in ("created_at", "stage_changed_at", "evaluated_at"):
        m[k] = _dt(m[k])
    m["metrics"] = _json(m["metrics"])
    m["filters"] = _json(m["filters"])
    m["headline"] = _headline(m["metrics"])
    return m


def _headline(metrics: Any) -> list[tuple[str, Any]]:
    """Top-level numeric gate metrics (and one level down), for a compact table cell."""
    out: list[tuple[str, Any]] = []
    if not isinstance(metrics, dict):
        return out
    for k, v in metrics.items():
        if isinstance(v, bool):
            out.append((k, "yes" if v else "no"))
        elif isinstance(v, int | float):
            out.append((k, round(v, 4)))
        elif isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, int | float) and not isinstance(v2, bool):
                    out.append((f"{k}.{k2}", round(v2, 4)))
    return out[:12]


def summary(conn: Connection) -> dict[str, Any]:
    """Production and canary per line (the overview card)."""
    if not available(conn):
        return {"available": False, "message": _MISSING, "lines": []}
    rows = conn.execute(text(
        "SELECT line, stage, id, model_version, canary_percent, stage_changed_at "
        "FROM checkpoints WHERE stage IN ('production', 'canary') ORDER BY line, stage")).all()
    lines: dict[str, dict[str, Any]] = {}
    for line, stage, cid, version, pct, changed in rows:
        lines.setdefault(line, {"line": line, "production": None, "canary": None})[stage] = {
            "id": cid, "model_version": version, "canary_percent": pct,
            "stage_changed_at": _dt(changed)}
    return {"available": True, "message": None, "lines": list(lines.values())}


def overview(conn: Connection, since: datetime, limit: int = 50) -> dict[str, Any]:
    """Checkpoints (newest first) with lineage, live thumbs-up rates of the live versions,
    and the latest rollout events."""
    if not available(conn):
        return {"available": False, "message": _MISSING, "checkpoints": [], "events": [],
                "live": [], "lines": []}
    ckpts = [_ckpt(r) for r in conn.execute(text(
        f"SELECT {_CKPT_COLS} FROM checkpoints c LEFT JOIN training_jobs j ON j.id = c.job_id "
        "ORDER BY c.id DESC LIMIT :limit"), {"limit": limit}).all()]
    live_rows = [_ckpt(r) for r in conn.execute(text(
        f"SELECT {_CKPT_COLS} FROM checkpoints c LEFT JOIN training_jobs j ON j.id = c.job_id "
        "WHERE c.stage IN ('production', 'canary') ORDER BY c.line, c.stage")).all()]
    versions = [c["model_version"] for c in live_rows]
    rates = {v["model_version"]: v for v in data.version_rates(conn, since, versions=versions)}
    live = []
    for c in live_rows:
        r = rates.get(c["model_version"], {"up": 0, "n": 0, "rate": None, "low": 0.0,
                                           "high": 1.0})
        live.append({"line": c["line"], "stage": c["stage"], "id": c["id"],
                     "model_version": c["model_version"],
                     "canary_percent": c["canary_percent"], **{k: r[k] for k in
                                                                ("up", "n", "rate", "low",
                                                                 "high")}})
    for c in ckpts:
        r = rates.get(c["model_version"])
        c["live"] = r
    events = [dict(r._mapping) | {"created_at": _dt(r.created_at)} for r in conn.execute(text(
        "SELECT id, line, checkpoint_id, action, from_stage, to_stage, canary_percent, actor, "
        "reason, created_at FROM rollout_events ORDER BY id DESC LIMIT 30")).all()]
    return {"available": True, "message": None, "checkpoints": ckpts, "events": events,
            "live": live, "lines": summary(conn)["lines"]}


def _api() -> tuple[Any, Any, Any] | None:
    """(service.registry, service.live, service.api.checkpoints) once the registry code is
    installed; None before, so the page shows what the tables hold and offers no actions."""
    try:
        from service import live, registry  # noqa: PLC0415 - optional
        from service.api import checkpoints as checkpoints_api  # noqa: PLC0415
    except ImportError:
        return None
    if not (all(hasattr(registry, n) for n in ("promote", "rollback", "Actor",
                                                 "get_checkpoint"))
            and hasattr(live, "live_report") and hasattr(checkpoints_api, "_after_change")):
        return None
    return registry, live, checkpoints_api


def actions_available() -> bool:
    """Promote/rollback forms appear once the registry's service functions exist."""
    return _api() is not None


def live_reports(conn: Connection, settings: Any) -> list[dict[str, Any]] | None:
    """The registry's live comparison (canary vs production since the canary started, with
    the sequential guard's verdict) for each line serving a checkpoint; None before the
    registry code exists."""
    mods = _api()
    if mods is None or not available(conn):
        return None
    from service.errors import ApiError

    lines = [r[0] for r in conn.execute(text(
        "SELECT DISTINCT line FROM checkpoints WHERE stage IN ('production', 'canary') "
        "ORDER BY line")).all()]
    out = []
    for line in lines:
        try:
            report = mods[1].live_report(conn, settings, line).as_dict()
        except ApiError as exc:
            out.append({"line": line, "error": exc.message})
            continue
        report["since"] = _dt(report.get("since"))
        out.append(report)
    return out


class ActionError(Exception):
    """A refused rollout change: the status and the registry's sentence naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def act(state: Any, checkpoint_id: int, action: str, form: dict[str, str], key_id: int
        ) -> str:
    """Run ``promote``, ``rollback`` or ``reject`` through the registry exactly as the API does (same
    functions, same after-change steps: serving cache, π_ref snapshot task, webhooks); the
    notice code for the redirect. Raises ActionError when it is refused."""
    mods = _api()
    if mods is None or action not in ACTIONS:
        raise ActionError(404, f"action: {action!r} is not available")
    registry, _live, checkpoints_api = mods
    from service.errors import ApiError

    actor = registry.Actor.key(key_id)
    reason = (form.get("reason") or "").strip()[:1000] or None
    if reason is not None and "\x00" in reason:  # Postgres cannot store it: a 422, not a 500
        raise ActionError(422, "reason: must not contain NUL (\\u0000) characters")
    try:
        if action == "reject":
            change = registry.reject(state.engine, state.settings, checkpoint_id, actor, reason)
            notice = "rejected"
        elif action == "promote":
            stage = form.get("stage")
            if stage not in ("canary", "production"):
                raise ActionError(422, "stage: must be canary or production")
            percent = None
            if stage == "canary":
                try:
                    percent = float(form.get("percent") or "")
                except ValueError:
                    raise ActionError(422, "percent: a number in (0, 100]") from None
                if not 0.0 < percent <= 100.0:
                    raise ActionError(422, "percent: a number in (0, 100]")
            change = registry.promote(state.engine, state.settings, checkpoint_id, stage,
                                      percent, actor, reason)
            notice = "canary_set" if stage == "canary" else "promoted"
        else:
            with state.engine.connect() as conn:
                row = registry.get_checkpoint(conn, checkpoint_id)
            if row["stage"] not in ("production", "canary"):
                raise ActionError(409, f"stage: checkpoint {checkpoint_id} is {row['stage']}; "
                                  "only production or a canary can be rolled back")
            change = registry.rollback(state.engine, state.settings, row["line"], actor,
                                       row["stage"], reason, expect_id=checkpoint_id)
            notice = "rolled_back"
    except ApiError as exc:
        raise ActionError(exc.status, exc.message) from None
    checkpoints_api._after_change(state, change)
    return notice
