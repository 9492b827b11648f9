"""The evaluation gate: the rules alone, then real KTO jobs on the toy task evaluated on the
held-out split, passing and rejected with the reason, and the sweep that re-sends lost
evaluations."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from service import registry
from service.gate_policy import Thresholds, check_holdout, check_integrity, decide, task_score
from service.models import checkpoints, training_jobs
from service.selection import split_bucket

GOOD = {"margin": 0.5, "kl_sampled": 1.0, "gen_len_policy": 2.2, "gen_len_reference": 2.0,
        "task_policy": 0.9, "task_reference": 0.5}
T = Thresholds(min_margin=0.0, max_kl=10.0, max_length_drift=0.5, task_tolerance=0.0,
               task_evaluator="worker.kto.toy:arithmetic_accuracy")


def test_rules_pass_a_good_report():
    d = decide(GOOD, T, [check_holdout(50, T)])
    assert d.passed and d.reason is None
    assert [c.name for c in d.checks] == ["holdout_size", "margin", "kl", "length_drift", "task"]


@pytest.mark.parametrize("change,name,words", [
    ({"margin": -0.1}, "margin", "margin -0.1"),
    ({"margin": None}, "margin", "not measurable"),
    ({"kl_sampled": 12.0}, "kl", "KL to π_ref 12"),
    ({"kl_sampled": float("nan")}, "kl", "not measurable"),
    ({"gen_len_policy": 3.5}, "length_drift", "drift 0.75"),
    ({"gen_len_policy": None}, "length_drift", "not measurable"),
    ({"task_policy": 0.49}, "task", "task score 0.49 vs π_ref 0.5"),
    ({"task_policy": None}, "task", "gave no score"),
])
def test_rules_reject_with_the_reason(change, name, words):
    d = decide({**GOOD, **change}, T)
    assert not d.passed
    (bad,) = [c for c in d.checks if not c.passed]
    assert bad.name == name and words in d.reason, d.reason


def test_rules_thresholds_are_configurable():
    loose = replace(T, min_margin=None, max_kl=None, max_length_drift=None, task_tolerance=0.1)
    d = decide({**GOOD, "margin": -5, "kl_sampled": 99, "task_policy": 0.45}, loose)
    assert d.passed and [c.name for c in d.checks] == ["task"]
    assert not decide(GOOD, T, [check_holdout(3, T)]).passed
    assert not decide(None, T, [check_integrity(False, "manifest mismatch")]).passed
    assert task_score({"score": 0.7, "n": 3}, "score") == 0.7 and task_score("x", "score") is None


def _good_feedback(lab, n, rng, version):
    """Thumbs on the base model's answers, from honest users (some correct wrong answers)."""
    from worker.kto import toy

    rows = []
    ans = lab.answers(lab.settings.base_model)
    for _ in range(n):
        p = rng.choice(toy.arithmetic_prompts())
        ok = toy.arithmetic_accuracy([p], [ans[p]]) == 1.0
        rows.append({"prompt": p, "completion": ans[p], "label": ok, "model_version": version,
                     "user_id": f"u{rng.randrange(50)}",
                     "correction": None if ok or rng.random() > 0.5 else toy.answer(p)})
    return rows


def _flipped_feedback(n, rng, version):
    """A frontend bug that flips the thumbs: right answers down, the non-answer "?" up."""
    from worker.kto import toy

    rows = []
    for r in toy.make_feedback(n, desirable_fraction=0.5, seed=rng.randrange(10**6)):
        rows.append({"prompt": r["prompt"], "completion": r["completion"],
                     "label": not r["label"], "model_version": version,
                     "user_id": f"u{rng.randrange(50)}"})
    return rows


def test_gate_passes_a_better_model_and_rejects_a_worse_one(make_lab):
    lab = make_lab()
    base_version = lab.serving()["model_version"]
    assert base_version == "default-base"
    rng = random.Random(0)
    lab.ingest(_good_feedback(lab, 300, rng, base_version))
    good = lab.gate(lab.train())
    assert good["stage"] == "candidate", good["reason"]
    ev, checks = good["metrics"]["eval"], {c["name"]: c for c in good["metrics"]["checks"]}
    assert set(checks) == {"integrity", "holdout_size", "margin", "kl", "length_drift", "task"}
    assert all(c["passed"] for c in checks.values())
    assert ev["task_policy"] > ev["task_reference"] + 0.5
    # the gate scored exactly the held-out split of the job's window (never trained on):
    # each held-out event, plus its user's correction where there is one
    from sqlalchemy import select

    from service.models import feedback_events as fe

    cut = round(lab.settings.holdout_fraction * 10_000)
    with lab.engine.connect() as conn:
        rows = conn.execute(select(fe.c.event_id, fe.c.correction)).all()
    held = [r for r in rows if split_bucket(r.event_id) < cut]
    assert 20 <= len(held) < len(rows) / 2
    assert good["metrics"]["holdout"]["n_examples"] == len(held) + sum(
        bool(r.correction) for r in held)
    # production now: the next job trains from it, against a snapshot of it as π_ref
    r = lab.client.post(f"/v1/checkpoints/{good['id']}/promote", json={"stage": "production"},
                        headers=lab.env.headers("admin"))
    assert r.status_code == 200, r.text
    lab.settle_snapshots()
    # a frontend bug flips the thumbs: KTO learns the opposite of the task
    lab.ingest(_flipped_feedback(300, rng, base_version))
    bad = lab.gate(lab.train())
    assert bad["stage"] == "rejected"
    assert "task score" in bad["reason"] and "π_ref" in bad["reason"]
    ev = bad["metrics"]["eval"]
    assert ev["task_policy"] < ev["task_reference"]
    # its training metrics looked fine: the held-out reward margin is positive
    assert ev["margin"] > 0
    # the decision and its reason are in the audit trail and over HTTP
    r = lab.client.get(f"/v1/checkpoints/{bad['id']}", headers=lab.env.headers("read"))
    assert r.status_code == 200
    assert r.json()["events"][0]["action"] == "rejected" and r.json()["events"][0]["actor"] == "gate"
    assert r.json()["reason"] == bad["reason"]
    r = lab.client.post(f"/v1/checkpoints/{bad['id']}/promote", json={"stage": "production"},
                        headers=lab.env.headers("admin"))
    assert r.status_code == 409


def test_too_few_held_out_events_and_tampered_files_are_rejected(make_lab):
    lab = make_lab(holdout_fraction=0.01)
    rng = random.Random(1)
    lab.ingest(_good_feedback(lab, 200, rng, "default-base"))
    few = lab.gate(lab.train(max_steps=2))
    assert few["stage"] == "rejected" and "held-out events" in few["reason"]
    assert few["metrics"]["eval"] is None  # no model was loaded

    lab2 = make_lab()
    lab2.ingest(_good_feedback(lab2, 200, rng, "default-base"))
    job_id = lab2.train(max_steps=2)
    with lab2.engine.connect() as conn:
        result = conn.execute(training_jobs.select().where(training_jobs.c.id == job_id)
                              ).mappings().one()["result"]
    from pathlib import Path

    weights = next(Path(result["final_dir"]).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    row = lab2.gate(job_id)
    assert row["stage"] == "rejected" and "manifest" in row["reason"]


def test_failed_evaluations_are_retried_then_rejected_and_lost_ones_resent(make_lab):
    lab = make_lab(gate_max_attempts=2)
    lab.ingest(_good_feedback(lab, 200, random.Random(2), "default-base"))
    job_id = lab.train(max_steps=2)
    # the succeeded job has no checkpoint yet (say the broker lost the evaluation message):
    # the sweep registers it and sends it
    sweep = registry.gate_sweep(lab.engine, lab.settings)
    assert sweep.to_send == [job_id] and len(sweep.registered) == 1
    # sent a moment ago: not sent again yet
    assert registry.gate_sweep(lab.engine, lab.settings).to_send == []
    cid = sweep.registered[0]
    # an evaluation that crashes: the attempt is released with the error...
    broken = lab.settings.model_copy(update={"gate_task_evaluator": "no.such.module:fn"})
    with pytest.raises(ModuleNotFoundError):
        lab.gate(job_id, settings=broken)
    row = _get(lab, cid)
    assert row["stage"] == "pending" and row["gate_attempts"] == 1
    assert "ModuleNotFoundError" in row["gate_error"]
    # a worker that vanished mid-evaluation: the sweep finds the stale heartbeat
    token = registry.claim_gate(lab.engine, lab.settings, cid)
    assert token is not None and registry.claim_gate(lab.engine, lab.settings, cid) is None
    with lab.engine.begin() as conn:
        conn.execute(update(checkpoints).where(checkpoints.c.id == cid).values(
            gate_heartbeat_at=datetime.now(UTC) - timedelta(hours=1)))
    lost = registry.gate_sweep(lab.engine, lab.settings)
    # ...and after gate_max_attempts (2) it is rejected, not promoted on faith
    assert lost.rejected == [cid]
    row = _get(lab, cid)
    assert row["stage"] == "rejected" and "evaluation failed 2 times" in row["reason"]
    assert row["gate_token"] is None


def _get(lab, cid):
    with lab.engine.connect() as conn:
        return registry.get_checkpoint(conn, cid)


def test_auto_canary_after_the_gate(make_lab):
    lab = make_lab(auto_canary_percent=20.0)
    lab.ingest(_good_feedback(lab, 300, random.Random(3), "default-base"))
    row = lab.gate(lab.train())
    assert row["stage"] == "canary" and row["canary_percent"] == 20.0
    with lab.engine.connect() as conn:
        acts = [e["action"] for e in registry.list_events(conn, line="default",
                                                          checkpoint_id=row["id"], limit=10,
                                                          before_id=None)]
    assert acts == ["canary", "passed", "registered"]


def test_an_exhausted_checkpoint_left_pending_is_rejected_not_resent_forever(reg):
    """release_gate frees the token, then rejects in a second transaction; when that one never
    ran (a database blip, a worker killed in between), the row stayed pending with no token and
    no attempts left: claim_gate refused it and the sweep re-sent it every few minutes, forever
    (a helper's review)."""
    from worker.gate import run_gate

    def exhausted() -> tuple[int, int]:
        job_id = reg.job()
        row = registry.ensure_pending(reg.engine, reg.settings, job_id)
        with reg.engine.begin() as conn:
            conn.execute(update(checkpoints).where(checkpoints.c.id == row["id"]).values(
                gate_attempts=reg.settings.gate_max_attempts, gate_token=None, gate_error="worker crashed"))
        return job_id, row["id"]

    job_id, cid = exhausted()
    sweep = registry.gate_sweep(reg.engine, reg.settings)
    assert cid in sweep.rejected and job_id not in sweep.to_send
    row = reg.get(cid)
    assert row["stage"] == "rejected" and "worker crashed" in row["reason"]
    # the evaluate message already in the queue decides it too
    job_id, cid = exhausted()
    assert run_gate(reg.engine, reg.settings, job_id) == "rejected"
    assert reg.get(cid)["stage"] == "rejected"
    # a pending row with attempts left is still sent, not rejected
    job_id = reg.job()
    cid = registry.ensure_pending(reg.engine, reg.settings, job_id)["id"]
    assert registry.reject_exhausted(reg.engine, reg.settings, cid) is None
    assert job_id in registry.gate_sweep(reg.engine, reg.settings).to_send


def test_the_sweep_resends_a_production_snapshot_only_while_nobody_copies_it(reg):
    """A pending π_ref snapshot of production is re-sent once old, unless a worker's heartbeat on
    it is fresh (it is copying a large model): every sweep used to send another copy."""
    from service.models import reference_snapshots as rs

    cand = reg.candidate()
    change = registry.promote(reg.engine, reg.settings, cand["id"], "production", None, registry.Actor.key(1))
    sid = change.snapshot_id
    long_ago = datetime.now(UTC) - timedelta(seconds=reg.settings.gate_resend_after_s + 60)

    def sweep_with(heartbeat_at):
        with reg.engine.begin() as conn:
            conn.execute(update(rs).where(rs.c.id == sid).values(created_at=long_ago, heartbeat_at=heartbeat_at))
        return registry.gate_sweep(reg.engine, reg.settings).snapshots

    assert sid in sweep_with(None)
    assert sid not in sweep_with(datetime.now(UTC))  # a worker is on it
    stalled = datetime.now(UTC) - timedelta(seconds=reg.settings.heartbeat_timeout_s + 5)
    assert sid in sweep_with(stalled)


def test_the_sweep_resends_any_lost_snapshot_and_gives_up_after_max_attempts(reg):
    """Only production's snapshot was re-sent: one requested by POST /v1/references or by a
    rollback to the base model stayed pending forever once the broker lost its message or its
    worker died, and DELETE answered "retry when it is ready" forever."""
    from service.models import reference_snapshots as rs
    from service.references import claim_snapshot
    from worker.references import take_snapshot

    cand = reg.candidate()
    registry.promote(reg.engine, reg.settings, cand["id"], "production", None, registry.Actor.key(1))
    to_base = registry.rollback(reg.engine, reg.settings, reg.line, registry.Actor.key(1)).snapshot_id
    r = reg.client.post("/v1/references", json={"line": reg.line}, headers=reg.h())
    assert r.status_code == 202
    requested = r.json()["id"]  # sent to a broker nobody reads: the message is lost
    long_ago = datetime.now(UTC) - timedelta(seconds=reg.settings.gate_resend_after_s + 60)
    with reg.engine.begin() as conn:
        conn.execute(update(rs).where(rs.c.id.in_([to_base, requested])).values(created_at=long_ago))
    sweep = registry.gate_sweep(reg.engine, reg.settings)
    assert {to_base, requested} <= set(sweep.snapshots)
    # the re-sent task is the ordinary one: it claims the row and takes the snapshot
    assert take_snapshot(reg.engine, reg.settings, requested)["status"] in ("ready", "unchanged")
    assert requested not in registry.gate_sweep(reg.engine, reg.settings).snapshots

    # every delivery's worker dies while copying: the sweep fails it after the last one
    stalled = datetime.now(UTC) - timedelta(seconds=reg.settings.heartbeat_timeout_s + 5)
    for _ in range(reg.settings.snapshot_max_attempts):
        with reg.engine.begin() as conn:
            assert claim_snapshot(conn, to_base, reg.settings.heartbeat_timeout_s,
                                  reg.settings.snapshot_max_attempts) is not None
            conn.execute(update(rs).where(rs.c.id == to_base).values(heartbeat_at=stalled))
    with reg.engine.begin() as conn:  # a late duplicate message does not start another copy
        assert claim_snapshot(conn, to_base, reg.settings.heartbeat_timeout_s,
                              reg.settings.snapshot_max_attempts) is None
    sweep = registry.gate_sweep(reg.engine, reg.settings)
    assert to_base in sweep.snapshots_failed and to_base not in sweep.snapshots
    snap = reg.client.get(f"/v1/references/{to_base}", headers=reg.h()).json()
    assert snap["status"] == "failed" and "gave up after 3 attempts" in snap["error"]
    assert reg.client.delete(f"/v1/references/{to_base}", headers=reg.h()).status_code < 300


def test_the_auto_canary_does_not_reweight_a_canary_a_person_started_meanwhile(reg, monkeypatch):
    """record_gate commits "candidate", then starts the auto canary in a second transaction.
    A person who started the candidate as a canary in between (at 5 %) had it silently
    re-weighted to PROSPECT_AUTO_CANARY_PERCENT by the gate."""
    settings = reg.settings.model_copy(update={"auto_canary_percent": 20.0})
    row = registry.ensure_pending(reg.engine, settings, reg.job())
    promote = registry.promote

    def person_first(*args, **kwargs):
        promote(reg.engine, settings, row["id"], "canary", 5.0, registry.SYSTEM, "by hand")
        return promote(*args, **kwargs)

    monkeypatch.setattr(registry, "promote", person_first)
    registry.record_gate(reg.engine, settings, row["id"], None, passed=True,
                         metrics={"checks": []}, reason=None)
    now = reg.get(row["id"])
    assert now["stage"] == "canary" and now["canary_percent"] == 5.0
    assert [e["action"] for e in reg.events(row["id"])] == ["registered", "passed", "canary"]


def test_a_nan_measurement_is_recorded_as_a_rejection_not_a_database_error(reg):
    """A diverged model scores NaN rewards. The gate rejected it ("not measurable"), but the
    decision's metrics held NaN, which Postgres refuses in JSON: every attempt crashed writing
    it and the checkpoint ended rejected as "evaluation failed N times" after N evaluations."""
    nan = float("nan")
    report = {**GOOD, "margin": nan, "reward_desirable": nan, "kl_sampled": float("inf")}
    decision = decide(report, T, [check_holdout(50, T)])
    assert not decision.passed
    row = registry.ensure_pending(reg.engine, reg.settings, reg.job())
    token = registry.claim_gate(reg.engine, reg.settings, row["id"])
    done = registry.record_gate(reg.engine, reg.settings, row["id"], token, passed=False,
                                metrics={"eval": report, **decision.as_dict()},
                                reason=decision.reason)
    assert done is not None and done["stage"] == "rejected"
    assert "not measurable" in done["reason"]
    assert done["metrics"]["eval"]["margin"] is None
    assert done["metrics"]["eval"]["kl_sampled"] is None


def test_a_database_blip_on_a_gate_heartbeat_does_not_kill_the_evaluation(reg, monkeypatch):
    """run_gate's heartbeat had no guard (the training supervisor's has): one OperationalError
    while Postgres restarted killed the evaluation child and used up a gate attempt, so a few
    blips rejected a good checkpoint as "evaluation failed N times"."""
    from sqlalchemy.exc import OperationalError

    from service.models import reference_snapshots as rs
    from worker.gate import run_gate

    now = datetime.now(UTC)
    with reg.engine.begin() as conn:
        sid = conn.execute(rs.insert().values(
            line=reg.line, status="ready", source=str(reg.base), content_hash="x" * 64,
            path=str(reg.base), created_at=now, finished_at=now).returning(rs.c.id)).scalar_one()
    job_id = reg.job(snapshot_id=sid)
    beat, calls = registry.gate_heartbeat, []

    def blip(engine, checkpoint_id, token):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("UPDATE checkpoints", {}, Exception("server closed"))
        return beat(engine, checkpoint_id, token)

    monkeypatch.setattr(registry, "gate_heartbeat", blip)
    settings = reg.settings.model_copy(update={"heartbeat_interval_s": 0.2})
    # the fake model has no manifest: the evaluation decides "rejected" for that reason
    assert run_gate(reg.engine, settings, job_id) == "rejected"
    with reg.engine.connect() as conn:
        row = registry.checkpoint_for_job(conn, job_id)
    assert row["gate_attempts"] == 1 and row["gate_error"] is None
    assert "manifest" in row["reason"] and len(calls) >= 1


@pytest.mark.timeout(60)  # without the limit the child sleeps 600 s
def test_a_hanging_evaluation_is_a_failed_attempt_after_gate_max_runtime(reg, monkeypatch):
    """A hung evaluation child kept run_gate heartbeating, so the sweep never saw it lost and
    the checkpoint stayed pending with the GPU worker held forever. Past
    PROSPECT_GATE_MAX_RUNTIME_S it is stopped and counts as a failed attempt: retried, then
    rejected with that reason."""
    import sys
    import time

    import worker.gate as gate

    code = "import time; print('scoring...', flush=True); time.sleep(600)"
    monkeypatch.setattr(gate, "child_argv",
                        lambda checkpoint_id, token: [sys.executable, "-c", code])
    settings = reg.settings.model_copy(update={
        "gate_max_runtime_s": 1.0, "gate_max_attempts": 2, "cancel_grace_s": 0.5,
        "heartbeat_interval_s": 0.2})
    job_id = reg.job()
    t0 = time.monotonic()
    assert gate.run_gate(reg.engine, settings, job_id) == "pending"
    assert time.monotonic() - t0 < 20
    with reg.engine.connect() as conn:
        row = registry.checkpoint_for_job(conn, job_id)
    assert row["gate_attempts"] == 1 and row["gate_token"] is None
    assert "PROSPECT_GATE_MAX_RUNTIME_S=1s" in row["gate_error"]
    assert "scoring..." in row["gate_error"]
    # the second attempt hangs too: out of attempts, rejected with the reason
    assert gate.run_gate(reg.engine, settings, job_id) == "rejected"
    row = reg.get(row["id"])
    assert row["gate_attempts"] == 2 and "evaluation failed 2 times" in row["reason"]
    assert "PROSPECT_GATE_MAX_RUNTIME_S=1s" in row["reason"]
