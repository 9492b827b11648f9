"""Rejecting a checkpoint by hand (POST /v1/checkpoints/{id}/reject): a pending one whose
evaluation is queued or running, a candidate; refusals; the audit trail and the webhook outbox;
and a running evaluation child stopped within seconds with its late verdict fenced out. Real
databases (both backends) and real child processes."""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from service import registry
from service.models import notifications


def _reject(reg, cid: int | str, body: Any = None, scope: str = "admin"):
    kwargs = {} if body is None else {"json": body}
    return reg.client.post(f"/v1/checkpoints/{cid}/reject", headers=reg.h(scope), **kwargs)


def _pending(reg) -> dict[str, Any]:
    row = registry.ensure_pending(reg.engine, reg.settings, reg.job())
    assert row is not None and row["stage"] == "pending"
    return row


def _outbox(reg, checkpoint_id: int) -> list[dict[str, Any]]:
    with reg.engine.connect() as conn:
        rows = conn.execute(select(notifications).order_by(notifications.c.id)).mappings().all()
    return [dict(r) for r in rows if r["payload"].get("checkpoint_id") == checkpoint_id
            and r["payload"].get("line") == reg.line]


@pytest.fixture
def hooked(reg):
    """The API's settings with webhooks on (rows land in the outbox); leftover rows are
    closed afterwards so no other test's sweep posts them."""
    state = reg.env.app.state
    before = state.settings
    state.settings = before.model_copy(update={"webhook_url": "http://127.0.0.1:9/hook"})
    try:
        yield state.settings
    finally:
        state.settings = before
    with reg.engine.begin() as conn:
        conn.execute(update(notifications).where(notifications.c.status == "pending")
                     .values(status="failed"))


def test_reject_a_pending_checkpoint_whose_evaluation_is_queued(reg, hooked):
    from worker.gate import run_gate

    row = _pending(reg)
    registry.mark_gate_sent(reg.engine, row["id"])  # the evaluation waits on the gpu queue
    r = _reject(reg, row["id"], {"reason": "trained on the wrong window"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["line"] == reg.line and body["previous_stage"] == "pending"
    assert body["stopping_evaluation"] is False
    assert body["checkpoint"]["stage"] == "rejected"
    assert body["checkpoint"]["reason"] == "trained on the wrong window"
    got = reg.get(row["id"])
    assert got["stage"] == "rejected" and got["evaluated_at"] is None and got["metrics"] is None
    # the audit row, by this key
    last = reg.events(row["id"])[-1]
    assert (last["action"], last["from_stage"], last["to_stage"]) == ("rejected", "pending",
                                                                      "rejected")
    assert last["actor"] == f"key:{last['key_id']}" and last["key_id"] is not None
    assert last["reason"] == "trained on the wrong window"
    # announced through the outbox, once
    [note] = _outbox(reg, row["id"])
    assert note["event"] == "rejected" and note["status"] == "pending"
    assert note["payload"]["actor"] == last["actor"]
    assert note["payload"]["reason"] == "trained on the wrong window"
    assert note["payload"]["from_stage"] == "pending"
    # the queued message arrives later: nothing runs, no attempt is used
    assert run_gate(reg.engine, reg.settings, row["job_id"]) == "rejected"
    assert reg.get(row["id"])["gate_attempts"] == 0
    # and the gate sweep does not re-send it
    assert row["job_id"] not in registry.gate_sweep(reg.engine, reg.settings).to_send
    # rejecting again: 409 naming the stage
    r = _reject(reg, row["id"])
    assert r.status_code == 409 and r.json()["errors"][0]["field"] == "stage"
    assert "already rejected" in r.json()["message"]


def test_reject_a_candidate_without_a_body(reg, hooked):
    cand = reg.candidate()
    r = _reject(reg, cand["id"])
    assert r.status_code == 200, r.text
    assert r.json()["previous_stage"] == "candidate"
    got = reg.get(cand["id"])
    assert got["stage"] == "rejected" and got["reason"].startswith("rejected by key:")
    assert got["metrics"] == {"checks": []}  # the gate's verdict stays on record
    assert [e["action"] for e in reg.events(cand["id"])] == ["registered", "passed", "rejected"]
    assert [n["event"] for n in _outbox(reg, cand["id"])] == ["rejected"]
    # it cannot be promoted any more
    r = reg.client.post(f"/v1/checkpoints/{cand['id']}/promote", json={"stage": "production"},
                        headers=reg.h())
    assert r.status_code == 409 and "rejected" in r.json()["message"]


def test_live_and_final_stages_are_refused(reg):
    prod, can, old = reg.candidate(), reg.candidate(), reg.candidate()
    registry.promote(reg.engine, reg.settings, old["id"], "production", None, registry.SYSTEM)
    registry.promote(reg.engine, reg.settings, prod["id"], "production", None, registry.SYSTEM)
    registry.promote(reg.engine, reg.settings, can["id"], "canary", 5.0, registry.SYSTEM)
    for cid, stage, words in ((prod["id"], "production", "roll it back"),
                              (can["id"], "canary", "roll the canary back"),
                              (old["id"], "retired", "no longer serves")):
        assert reg.get(cid)["stage"] == stage
        r = _reject(reg, cid, {"reason": "no"})
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "not_rejectable"
        assert r.json()["errors"][0]["field"] == "stage" and words in r.json()["message"]
        assert reg.get(cid)["stage"] == stage
    assert [e["action"] for e in reg.events(can["id"])][-1] == "canary"


def test_scopes_unknown_and_bad_reason(reg):
    row = _pending(reg)
    for scope in ("ingest", "read"):
        r = _reject(reg, row["id"], {"reason": "x"}, scope=scope)
        assert r.status_code == 403, r.text
    assert reg.client.post(f"/v1/checkpoints/{row['id']}/reject").status_code == 401
    r = _reject(reg, 2_000_000_000)
    assert r.status_code == 404 and r.json()["errors"][0]["field"] == "checkpoint_id"
    for body in ({"reason": "a\x00b"}, {"reason": "x" * 1001}, {"reason": 5}):
        r = _reject(reg, row["id"], body)
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == "body.reason", r.text  # as promote names it
    r = _reject(reg, row["id"], {"why": "x"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.why"
    for cid in ("0", "x"):
        r = _reject(reg, cid)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "path.checkpoint_id"
    assert reg.get(row["id"])["stage"] == "pending"


def test_a_stage_change_between_read_and_write_is_a_409(reg, monkeypatch):
    """The gate decides while the request runs: the conditional UPDATE finds the stage moved
    and the verdict stands instead of being overwritten."""
    row = _pending(reg)
    read = registry.get_checkpoint

    def gate_decides_meanwhile(conn, checkpoint_id):
        got = read(conn, checkpoint_id)
        if got["stage"] == "pending":
            registry.record_gate(reg.engine, reg.settings, checkpoint_id, None, passed=True,
                                 metrics={"checks": []}, reason=None)
        return got

    monkeypatch.setattr(registry, "get_checkpoint", gate_decides_meanwhile)
    r = _reject(reg, row["id"], {"reason": "too late"})
    monkeypatch.undo()
    assert r.status_code == 409 and r.json()["error"] == "stage_changed", r.text
    assert r.json()["errors"][0]["field"] == "stage"
    got = reg.get(row["id"])
    assert got["stage"] == "candidate" and got["reason"] is None
    assert [e["action"] for e in reg.events(row["id"])] == ["registered", "passed"]


def test_a_late_verdict_heartbeat_or_failure_cannot_undo_a_rejection(reg):
    """Everything a running attempt writes is conditional on stage = 'pending' and its token."""
    from worker.gate import evaluate

    row = _pending(reg)
    token = registry.claim_gate(reg.engine, reg.settings, row["id"])
    assert token is not None and not registry.gate_should_stop(reg.engine, row["id"], token)
    r = _reject(reg, row["id"], {"reason": "stop it"})
    assert r.status_code == 200 and r.json()["stopping_evaluation"] is True
    assert registry.gate_should_stop(reg.engine, row["id"], token)
    assert registry.gate_heartbeat(reg.engine, row["id"], token) is False
    assert registry.record_gate(reg.engine, reg.settings, row["id"], token, passed=True,
                                metrics={"checks": []}, reason=None) is None
    assert registry.record_gate(reg.engine, reg.settings, row["id"], None, passed=False,
                                metrics={}, reason="gate says no") is None
    registry.release_gate(reg.engine, reg.settings, row["id"], token, "crashed")
    assert registry.reject_exhausted(reg.engine, reg.settings, row["id"]) is None
    # the child started after the rejection gives up before loading anything
    assert evaluate(reg.engine, reg.settings, row["id"], token) is None
    got = reg.get(row["id"])
    assert (got["stage"], got["reason"], got["metrics"], got["gate_error"], got["gate_token"]) == (
        "rejected", "stop it", None, None, None)
    assert [e["action"] for e in reg.events(row["id"])] == ["registered", "rejected"]
    assert reg.events(row["id"])[-1]["details"]["evaluation_running"] is True


_CHILD = textwrap.dedent("""
    import os, pathlib, sys, time
    cid, token, d = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    (d / "pid").write_text(str(os.getpid()))
    print("scoring...", flush=True)
    from service import registry
    from service.db import make_engine
    from service.settings import Settings
    s = Settings()
    e = make_engine(s)
    (d / "ready").write_text("1")
    while not (d / "go").exists():
        time.sleep(0.05)
    while True:  # the evaluation finishes and keeps trying to write its verdict
        done = registry.record_gate(e, s, cid, token, passed=True, metrics={"checks": []},
                                    reason=None)
        with open(d / "verdicts", "a") as f:
            f.write("written\\n" if done else "fenced\\n")
        time.sleep(0.1)
""")


def _wait(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return True
    return state == "Z"


@pytest.mark.timeout(120)  # without the stop the child loops forever
def test_a_running_evaluation_is_stopped_within_seconds_and_its_verdict_not_written(
        reg, tmp_path, monkeypatch):
    """A real evaluation child under run_gate: rejected while it runs, it is stopped within
    seconds (the heartbeat, every 60 s here, is not what stops it), and the verdict it tries
    to write after the rejection is refused."""
    import worker.gate as gate

    monkeypatch.setattr(gate, "child_argv", lambda checkpoint_id, token: [
        sys.executable, "-c", _CHILD, str(checkpoint_id), token, str(tmp_path)])
    settings = reg.settings.model_copy(update={
        "heartbeat_interval_s": 60.0, "cancel_grace_s": 5.0, "gate_max_runtime_s": 0.0})
    row = _pending(reg)
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(
        stage=gate.run_gate(reg.engine, settings, row["job_id"])), daemon=True)
    worker.start()
    _wait(tmp_path / "ready")
    pid = int((tmp_path / "pid").read_text())
    assert reg.get(row["id"])["gate_token"] is not None  # the attempt holds the row
    t0 = time.monotonic()
    r = _reject(reg, row["id"], {"reason": "not this one"})
    assert r.status_code == 200 and r.json()["stopping_evaluation"] is True, r.text
    (tmp_path / "go").write_text("1")
    worker.join(timeout=30)
    stopped_after = time.monotonic() - t0
    assert not worker.is_alive(), "the evaluation was not stopped"
    assert result["stage"] == "rejected"
    assert stopped_after < 10, stopped_after  # STOP_POLL_S (2 s) plus SIGTERM
    assert _dead(pid)
    verdicts = (tmp_path / "verdicts").read_text().split() if (tmp_path / "verdicts").exists() else []
    assert "written" not in verdicts
    got = reg.get(row["id"])
    assert (got["stage"], got["reason"], got["metrics"], got["evaluated_at"]) == (
        "rejected", "not this one", None, None)
    assert got["gate_attempts"] == 1 and got["gate_error"] is None  # not a failed attempt
    assert [e["action"] for e in reg.events(row["id"])] == ["registered", "rejected"]
    logs = list(Path(settings.artifacts_root).rglob("gate-1.log"))
    assert any("scoring..." in p.read_text() for p in logs)
