"""Live comparison of a canary with production from the feedback they receive, and the guard.

Feedback carries ``model_version`` (the serving call's answer), so each version's thumbs-up
rate is a count over ``feedback_events``. Both arms are counted over the same window (since
the canary started), with the latest vote only, and at most
``PROSPECT_GUARD_MAX_EVENTS_PER_USER`` votes of one user per arm, so one user (or a script)
cannot decide a rollout.

The guard (beat, ``prospect.canary_guard``) asks ``service.rollout_stats.evaluate_guard`` -- an
always-valid sequential test, so looking every minute does not inflate its error rates -- and
acts on the first decision: ROLLBACK rejects the canary (its users return to production),
PROMOTE makes it production (which snapshots it as the next π_ref). INCONCLUSIVE (both arms
past ``guard_max_samples``) is recorded once and announced; the canary keeps running until
someone decides.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, exists, select

from service import notify, registry
from service.errors import ApiError
from service.models import checkpoints as ck
from service.models import rollout_events as ev
from service.queries import Filters
from service.rollout_stats import (
    Decision,
    GuardConfig,
    GuardResult,
    evaluate_guard,
    two_proportion_test,
    wilson_interval,
)
from service.selection import Selection, count_selection
from service.settings import Settings

log = logging.getLogger("prospect.live")


def guard_config(settings: Settings) -> GuardConfig:
    return GuardConfig(alpha=settings.guard_alpha,
                       noninferiority_margin=settings.guard_noninferiority_margin,
                       min_samples=settings.guard_min_samples,
                       max_samples=settings.guard_max_samples, tau=settings.guard_tau)


@dataclass(frozen=True)
class VersionStats:
    model_version: str
    n: int
    up: int
    rate: float | None
    interval: tuple[float, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_stats(conn: Connection, version: str, since: datetime | None,
                  max_per_user: int | None) -> VersionStats:
    """Thumbs-up count of one version's latest votes since ``since`` (occurred_at)."""
    sel = Selection(Filters(since=since, model_version=version), holdout_fraction=0.0,
                    max_events_per_user=max_per_user or None)
    c = count_selection(conn, sel)
    n = c.n_desirable + c.n_undesirable
    return VersionStats(version, n, c.n_desirable, c.n_desirable / n if n else None,
                        wilson_interval(c.n_desirable, n))


@dataclass
class LiveReport:
    line: str
    production: VersionStats
    canary: VersionStats | None = None
    canary_checkpoint_id: int | None = None
    canary_percent: float | None = None
    since: datetime | None = None
    #: One-off two-proportion z-test, for display; decisions use the sequential guard.
    test: dict[str, Any] | None = None
    guard: GuardResult | None = None
    guard_settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "line": self.line, "since": self.since,
            "production": self.production.as_dict(),
            "canary": None if self.canary is None else {
                **self.canary.as_dict(), "checkpoint_id": self.canary_checkpoint_id,
                "percent": self.canary_percent},
            "two_proportion_test": self.test,
            "guard": None if self.guard is None else {
                **asdict(self.guard), "decision": self.guard.decision.value},
            "guard_settings": self.guard_settings,
        }
        return out


def live_report(conn: Connection, settings: Settings, line: str) -> LiveReport:
    """Production and canary (if any) of ``line``, counted since the canary started (or, with
    no canary, since production last changed)."""
    state = registry.serving_state(conn, settings, line)
    cap = settings.guard_max_events_per_user
    canary = registry.in_stage(conn, line, "canary")
    prod = registry.in_stage(conn, line, "production")
    since = canary["stage_changed_at"] if canary else (prod["stage_changed_at"] if prod else None)
    report = LiveReport(line, version_stats(conn, state.production_version, since, cap),
                        since=since, guard_settings={
                            "enabled": settings.guard_enabled,
                            "auto_rollback": settings.guard_auto_rollback,
                            "auto_promote": settings.guard_auto_promote,
                            **asdict(guard_config(settings))})
    if canary is not None:
        cs = version_stats(conn, canary["model_version"], since, cap)
        report.canary, report.canary_checkpoint_id = cs, canary["id"]
        report.canary_percent = canary["canary_percent"]
        t = two_proportion_test(cs.up, cs.n, report.production.up, report.production.n)
        report.test = asdict(t)
        report.guard = evaluate_guard(cs.up, cs.n, report.production.up, report.production.n,
                                      guard_config(settings))
    return report


@dataclass
class GuardAction:
    line: str
    checkpoint_id: int
    decision: str
    action: str
    reason: str
    snapshot_id: int | None = None


def _inconclusive_recorded(conn: Connection, checkpoint_id: int) -> bool:
    return bool(conn.execute(select(exists().where(
        ev.c.checkpoint_id == checkpoint_id, ev.c.action == "guard_inconclusive"))).scalar_one())


def guard_tick(engine: Engine, settings: Settings) -> list[GuardAction]:
    """Judge every running canary once and act on ROLLBACK / PROMOTE (when enabled)."""
    if not settings.guard_enabled:
        return []
    with engine.connect() as conn:
        lines = conn.execute(select(ck.c.line).where(ck.c.stage == "canary")).scalars().all()
    out: list[GuardAction] = []
    for line in lines:
        try:
            out.extend(_guard_line(engine, settings, line))
        except ApiError as exc:  # someone else acted on the line meanwhile
            log.info("guard on %s: %s", line, exc.message)
        except Exception:  # noqa: BLE001 - one line's error must not leave the others unguarded
            log.exception("guard on %s failed", line)
    return out


def _guard_line(engine: Engine, settings: Settings, line: str) -> list[GuardAction]:
    with engine.begin() as conn:
        rep = live_report(conn, settings, line)
    if rep.guard is None or rep.canary_checkpoint_id is None:
        return []
    g, cid = rep.guard, rep.canary_checkpoint_id
    reason = f"guard: {g.reason}"
    details = {"p_value_harm": g.p_value_harm, "p_value_noninferiority": g.p_value_noninferiority,
               "canary": rep.canary.as_dict() if rep.canary else None,
               "production": rep.production.as_dict()}
    if g.decision == Decision.ROLLBACK and settings.guard_auto_rollback:
        registry.rollback(engine, settings, line, registry.GUARD, "canary", reason,
                          expect_id=cid)
        log.warning("line %s: canary %s rolled back: %s", line, cid, g.reason)
        return [GuardAction(line, cid, g.decision.value, "rolled_back", reason)]
    if g.decision == Decision.PROMOTE and settings.guard_auto_promote:
        change = registry.promote(engine, settings, cid, "production", None, registry.GUARD,
                                  reason, expect_stage="canary")
        log.info("line %s: canary %s promoted: %s", line, cid, g.reason)
        return [GuardAction(line, cid, g.decision.value, "promoted", reason, change.snapshot_id)]
    if g.decision == Decision.INCONCLUSIVE:
        with engine.begin() as conn:
            if not _inconclusive_recorded(conn, cid):
                registry.record_event(conn, line=line, checkpoint_id=cid,
                                      action="guard_inconclusive", actor=registry.GUARD,
                                      from_stage="canary", to_stage="canary", reason=reason,
                                      details=details)
                row = registry.get_checkpoint(conn, cid)
                notify.enqueue(conn, settings, "guard_inconclusive",
                               {"line": line, "checkpoint_id": cid,
                                "model_version": row["model_version"], "reason": reason},
                               f"guard_inconclusive:{cid}")
                return [GuardAction(line, cid, g.decision.value, "recorded", reason)]
    return [GuardAction(line, cid, g.decision.value, "none", reason)]
