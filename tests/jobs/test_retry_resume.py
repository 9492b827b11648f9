"""A retried job's training child (worker/job_child.py, in this process): it resumes from the
resume states of the run before the retry, unless events of its selection were erased since:
those states learned from the erased events, so it deletes them and starts over."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from service import jobs
from service.job_schemas import JobFilters, JobParams
from tests.jobs.conftest import seed_feedback, wait_for
from worker.resume_states import discard, trained_on_other_events


def _states(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "manifest.json").exists())


def _digest(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["data"]["event_ids_sha256"]


@pytest.mark.parametrize("erased", [False, True], ids=["kept", "erased"])
def test_a_retried_job_resumes_unless_its_events_were_erased(jclient, jenv, erased):
    import worker.job_child as jc
    from worker.references import current_reference

    seed_feedback(jclient, jenv, n=60, users=6)
    engine = jenv.app.state.engine
    job = jobs.create_job(engine, jenv.settings, line="default", filters=JobFilters(),
                          params=JobParams(max_steps=40, save_every_steps=2, microbatch_size=4,
                                           learning_rate=1e-3))
    claim = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    assert jobs.set_reference(engine, claim,
                              current_reference(engine, jenv.settings, "default")["id"])
    with engine.connect() as conn:
        out = Path(jobs.get_job(conn, job["id"])["output_dir"])

    # Attempt 1 is stopped from outside once it saved resume states: the SIGTERM the
    # supervisor sends past PROSPECT_JOB_MAX_RUNTIME_S, which then fails the job.
    def stop_after_a_checkpoint() -> None:
        wait_for(lambda: _states(out), 120, "a resume state of attempt 1", every=0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # job_child's own handler: stop within a step

    stopper = threading.Thread(target=stop_after_a_checkpoint, daemon=True)
    stopper.start()
    assert jc.run(job["id"], claim.token, jenv.settings) == jc.EXIT_INTERRUPTED
    stopper.join()
    assert jobs.finish(engine, claim, "failed", error="training stopped: the attempt ran longer "
                                                      "than PROSPECT_JOB_MAX_RUNTIME_S")
    stopped = _states(out)[-1]
    stopped_at = int(stopped.name.split("-")[-1])
    assert 0 < stopped_at < 40, "attempt 1 finished before the stop; make it longer"
    old_digest = _digest(stopped)

    if erased:
        r = jclient.post("/v1/erasures", json={"user_id": "user-3", "reason": "test"},
                         headers=jenv.headers("admin"))
        assert r.status_code == 201, r.text
        [link] = [j for j in r.json()["jobs"] if j["job_id"] == job["id"]]
        assert link["n_trained"] > 0

    r = jclient.post(f"/v1/jobs/{job['id']}/retry", headers=jenv.headers("admin"))
    assert r.status_code == 202, r.text
    again = jobs.claim(engine, job["id"], "host-b", jenv.settings)
    assert again is not None and again.attempt == 2
    assert jc.run(job["id"], again.token, jenv.settings) == jc.EXIT_OK
    with engine.connect() as conn:
        row = jobs.get_job(conn, job["id"])
    assert row["status"] == "succeeded", row["error"]
    assert row["step"] == row["total_steps"] == 40 and row["retries"] == 1
    result = row["result"]
    if not erased:
        assert result["resumed_from_step"] == stopped_at and result["resume_discarded"] is None
        assert row["data"]["event_ids_sha256"] == old_digest
        return
    # The states trained on the erased events were neither resumed nor kept.
    assert result["resumed_from_step"] == 0 and result["resumed_from"] is None
    assert "deleted since" in result["resume_discarded"], result
    new_digest = row["data"]["event_ids_sha256"]
    assert new_digest != old_digest
    left = _states(out)
    assert left and all(_digest(p) == new_digest for p in left)
    assert _digest(Path(result["final_dir"])) == new_digest
    assert not list(out.glob("checkpoints.discarded-*"))


def _state(root: Path, step: int, digest: str | None) -> Path:
    p = root / "checkpoints" / f"step-{step:08d}"
    p.mkdir(parents=True)
    data = {"min_event_id": 0, "max_event_id": 9}
    if digest is not None:
        data["event_ids_sha256"] = digest
    (p / "manifest.json").write_text(json.dumps({"job_id": 1, "data": data}))
    return p


def test_only_a_different_event_digest_discards_resume_states(tmp_path):
    same = _state(tmp_path / "a", 4, "a" * 64)
    assert trained_on_other_events(same, "a" * 64) is None
    # written before the digest was recorded, or unreadable: the trainer decides
    assert trained_on_other_events(_state(tmp_path / "b", 4, None), "a" * 64) is None
    assert trained_on_other_events(tmp_path / "c" / "checkpoints" / "step-00000004", "a") is None
    why = trained_on_other_events(same, "b" * 64)
    assert why and "step-00000004" in why and "aaaaaaaaaaaa" in why and "bbbbbbbbbbbb" in why

    (tmp_path / "a" / "checkpoints.discarded-0badf00d").mkdir()  # left by a crash midway
    discard(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == []
    discard(tmp_path / "a")  # nothing left: no error
