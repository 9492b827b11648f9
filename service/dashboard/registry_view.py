"""What the dashboard shows of the checkpoint registry, and the rollout actions it offers.

The registry (checkpoints, rollout_events) is built beside the dashboard; this module reads
its tables with plain SQL over the columns the migration defines and degrades to an
explanatory message when the tables are not there (an older database), so the rest of the
dashboard never depends on it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

from service.dashboard import data

ACTIONS = ("promote", "rollback")
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


def actions_available() -> bool:
    """Promote/rollback forms appear once the registry's service functions exist."""
    return _registry_api() is not None


def _registry_api() -> Any:
    try:
        from service import registry  # noqa: PLC0415 - optional until the registry lands
    except ImportError:
        return None
    if all(hasattr(registry, n) for n in ("promote", "rollback")):
        return registry
    return None


def act(engine: Engine, settings: Any, checkpoint_id: int, action: str, form: dict[str, str],
        key_id: int) -> str:
    """Run a rollout action through the registry; a notice code for the redirect."""
    registry = _registry_api()
    if registry is None or action not in ACTIONS:
        return "rollout_refused"
    from service.errors import ApiError

    try:
        if action == "promote":
            registry.promote(engine, settings, checkpoint_id, form, key_id)
            return "promoted"
        registry.rollback(engine, settings, checkpoint_id, form, key_id)
        return "rolled_back"
    except ApiError:
        return "rollout_refused"
