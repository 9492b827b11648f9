"""Beat's per-line tasks: one line's error is logged with its name and the other lines still
run (the periodic π_ref snapshot and the retraining check used to stop at the first failing
line, so one bad base model path left every line after it unsnapshotted and never retrained).
The task bodies run in-process on a real SQLite database; only their engine and settings
accessors are pointed at it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service import jobs, migrate
from service.lines import put_line
from service.models import reference_snapshots as rs
from service.settings import Settings


@pytest.fixture
def beat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from service.db import make_engine
    from worker import tasks

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'beat.db'}",
                        artifacts_root=str(tmp_path / "artifacts"), broker_url="memory://",
                        user_id_key="test-user-id-key-0123456789")
    migrate.upgrade(settings)
    engine = make_engine(settings)
    good = tmp_path / "good-model"
    good.mkdir()
    (good / "config.json").write_text("{}")
    (good / "model.safetensors").write_bytes(os.urandom(1024))
    with engine.begin() as conn:
        put_line(conn, "a-gone", str(tmp_path / "no-such-model"))  # sorts first
        put_line(conn, "b-good", str(good))
    monkeypatch.setattr(tasks, "_engine", lambda: engine)
    monkeypatch.setattr(tasks, "_settings", lambda: settings)
    yield tasks, engine
    engine.dispose()


def test_periodic_snapshot_goes_on_past_a_line_whose_model_is_gone(beat, caplog):
    tasks, engine = beat
    with caplog.at_level(logging.ERROR, logger="prospect.tasks"):
        out = tasks.periodic_snapshot()
    assert set(out["failed"]) == {"a-gone"} and "does not exist" in out["failed"]["a-gone"]
    assert "a-gone" in caplog.text
    with engine.connect() as conn:
        snap = conn.execute(select(rs).where(rs.c.id == out["lines"]["b-good"])).mappings().one()
    assert snap["line"] == "b-good" and snap["status"] == "ready"


def test_retraining_check_goes_on_past_a_failing_line(beat, caplog, monkeypatch):
    tasks, _ = beat
    real = jobs.check_retraining

    def one_line_breaks(engine: Any, settings: Settings, line: str) -> jobs.RetrainDecision:
        if line == "a-gone":
            raise RuntimeError("statement timeout on a-gone")
        return real(engine, settings, line)

    monkeypatch.setattr(jobs, "check_retraining", one_line_breaks)
    with caplog.at_level(logging.ERROR, logger="prospect.tasks"):
        out = tasks.check_retraining()
    assert out["failed"] == {"a-gone": "RuntimeError: statement timeout on a-gone"}
    assert "a-gone" in caplog.text
    assert out["lines"]["b-good"]["job_id"] is None and "needed" in out["lines"]["b-good"]["reason"]


def test_job_failures_are_announced_with_the_gate_sweep_off(beat, monkeypatch):
    """job_failed was queued only by the gate sweep: with GATE_SWEEP_INTERVAL_S=0 (and the
    webhook on) a failed job was never announced. The delivery task, which beat runs
    whenever a webhook is set, queues it now."""
    import json
    import threading
    from datetime import UTC, datetime
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from service.job_schemas import JobFilters, JobParams
    from service.models import training_jobs

    tasks, engine = beat
    got: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = tasks._settings().model_copy(update={
        "webhook_url": f"http://127.0.0.1:{server.server_address[1]}/hook",
        "gate_sweep_interval_s": 0.0})
    monkeypatch.setattr(tasks, "_settings", lambda: settings)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        job_id = conn.execute(training_jobs.insert().values(
            line="b-good", status="failed", trigger="api", error="CUDA out of memory",
            params=JobParams().model_dump(mode="json"), filters=JobFilters().as_json(),
            min_event_id=0, max_event_id=0, n_desirable=1, n_undesirable=1, n_users=1,
            lambda_d=1.0, lambda_u=1.0, data={}, max_attempts=3, created_at=now,
            finished_at=now).returning(training_jobs.c.id)).scalar_one()
    try:
        tasks.deliver_notifications()
        tasks.deliver_notifications()
    finally:
        server.shutdown()
        server.server_close()
    assert [(b["event"], b["job_id"]) for b in got] == [("job_failed", job_id)]
    assert got[0]["reason"] == "CUDA out of memory"


def test_retention_task_prunes_the_webhook_outbox(beat, monkeypatch):
    """Beat's retention run also deletes outbox rows settled longer ago than
    PROSPECT_WEBHOOK_KEEP_DAYS and says how many; pending rows stay. It does so even when the
    artifact part fails, so one stuck folder cannot let the outbox grow forever."""
    from datetime import UTC, datetime, timedelta

    from service import retention
    from service.models import notifications

    tasks, engine = beat
    old = datetime.now(UTC) - timedelta(days=31)

    def add(status: str, key: str) -> None:
        with engine.begin() as conn:
            conn.execute(notifications.insert().values(
                dedup_key=key, event="promoted", payload={}, status=status, attempts=1,
                next_attempt_at=old, created_at=old))

    add("sent", "s1")
    add("failed", "f1")
    add("pending", "p1")
    out = tasks.retention()
    assert out["notifications_pruned"] == 2 and out["removed"] == []
    add("sent", "s2")

    def broken(*_a: Any, **_k: Any) -> None:
        raise PermissionError("artifacts: read-only filesystem")

    monkeypatch.setattr(retention, "apply", broken)
    with pytest.raises(PermissionError):
        tasks.retention()
    with engine.connect() as conn:
        left = conn.execute(select(notifications.c.dedup_key)).scalars().all()
    assert left == ["p1"]
