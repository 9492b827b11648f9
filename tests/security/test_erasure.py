"""Data rights: erase a user's feedback, retention, and the lineage of what was deleted.

The lineage must agree with what the trainer actually reads (``iter_selected``): the tests
compute the expected counts from it *before* deleting, on both backends.
"""

from __future__ import annotations

import itertools
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, insert, select, update

from service import erasure, jobs
from service.ingest import event_id_hash, hash_user_id, ingest_items
from service.job_schemas import JobFilters, JobParams
from service.jobs import selection_for
from service.models import checkpoints, erased_event_ids, erasures, feedback_events, training_jobs
from service.selection import iter_selected
from tests.conftest import Env
from tests.service.helpers import event

NOW = datetime.now(UTC)
_ids = itertools.count()


@pytest.fixture(autouse=True)
def _deterministic_event_ids() -> None:
    """The held-out split hashes event ids: the same ids in every run, whatever ran before."""
    global _ids
    _ids = itertools.count()


def add_events(env: Env, specs: list[dict[str, Any]]) -> list[int]:
    """Store events (through the ingestion path) and return their row ids, in order."""
    items = [event(**{"event_id": f"se-{next(_ids)}", **s}) for s in specs]
    model = env.app.state.models["FeedbackIn"]
    outs = ingest_items(items, model, env.settings, env.app.state.engine)
    assert all(o.status == "accepted" for o in outs), [o.as_dict() for o in outs]
    with env.app.state.engine.connect() as conn:
        ids = dict(conn.execute(select(feedback_events.c.event_id, feedback_events.c.id).where(
            feedback_events.c.event_id.in_([i["event_id"] for i in items]))).tuples().all())
    return [ids[i["event_id"]] for i in items]


def make_job(env: Env, status: str = "succeeded", attempt: int = 1,
             **filters: Any) -> dict[str, Any]:
    settings = env.settings
    job = jobs.create_job(env.app.state.engine, settings, line="default", params=JobParams(),
                          filters=JobFilters(**filters))
    values: dict[str, Any] = {"status": status, "attempt": attempt}
    if status != "queued" or attempt:
        values["started_at"] = NOW
    with env.app.state.engine.begin() as conn:
        conn.execute(update(training_jobs).where(training_jobs.c.id == job["id"])
                     .values(**values))
        return dict(conn.execute(select(training_jobs).where(
            training_jobs.c.id == job["id"])).mappings().one())


def add_checkpoint(env: Env, job_id: int | None, stage: str = "production",
                   parent_id: int | None = None) -> int:
    with env.app.state.engine.begin() as conn:
        cid = conn.execute(insert(checkpoints).values(
            line="default", model_version=f"tmp-{job_id}-{stage}-{parent_id}", job_id=job_id,
            parent_id=parent_id, base_model="toy-base", format="full", stage=stage,
            created_at=NOW, stage_changed_at=NOW).returning(checkpoints.c.id)).scalar_one()
        conn.execute(update(checkpoints).where(checkpoints.c.id == cid)
                     .values(model_version=f"default-ckpt-{cid}"))
    return int(cid)


def selected_ids(env: Env, job: dict[str, Any], split: str = "train") -> set[int]:
    from dataclasses import replace

    sel = replace(selection_for(job, env.settings), split=split)
    with env.app.state.engine.connect() as conn:
        return {r["id"] for r in iter_selected(conn, sel)}


def user_ids(env: Env, user: str) -> set[int]:
    h = hash_user_id(user, env.settings.user_id_key)
    with env.app.state.engine.connect() as conn:
        return set(conn.execute(select(feedback_events.c.id)
                                .where(feedback_events.c.user_hash == h)).scalars())


def votes(users: list[str], n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"user_id": users[i % len(users)], "label": "up" if i % 3 else "down", **extra}
            for i in range(n)]


def env_with(env: Env, **overrides: Any) -> Env:
    return Env(env.backend, env.url, env.make_settings(**overrides), env.app, env.keys)


def test_lineage_counts_match_what_the_trainer_reads(rights_env):
    """The erasure's per-user SQL agrees with iter_selected event by event: cap, held-out
    split, replacements, filters."""
    env = env_with(rights_env, holdout_fraction=0.3, max_events_per_user=4)
    specs = votes(["alice", "bob", "carol"], 45)
    specs += [{"user_id": None, "source": "app", "label": "up" if i % 2 else "down"}
              for i in range(10)]
    specs += [{"user_id": "alice", "model_version": "m-other"} for _ in range(4)]
    ids = add_events(env, specs)
    # a replaced vote is not trained on
    add_events(env, [{"user_id": "bob", "replaces": "evt-x-none"}])
    for filters in ({}, {"model_version": "m-2024-01"}, {"source": "app"}):
        job = make_job(env, **filters)
        train, held = selected_ids(env, job), selected_ids(env, job, "holdout")
        sel = selection_for(job, env.settings)
        from dataclasses import replace

        with env.app.state.engine.connect() as conn:
            rows = conn.execute(select(feedback_events.c.id, feedback_events.c.user_hash)
                                .where(feedback_events.c.id.in_(ids))).all()
            for r in rows:
                users = {r.user_hash or ""}
                got = erasure._selected_among(conn, sel, [r.id], users)
                assert got == (r.id in train), (filters, r.id)
                got = erasure._selected_among(conn, replace(sel, split="holdout"), [r.id], users)
                assert got == (r.id in held), (filters, r.id)
        assert train and (held or filters)
        with env.app.state.engine.begin() as conn:
            conn.execute(update(training_jobs).where(training_jobs.c.id == job["id"])
                         .values(status="succeeded"))


def test_erase_user_and_the_lineage_of_what_was_deleted(rights_env):
    env = env_with(rights_env, holdout_fraction=0.25, max_events_per_user=6)
    engine = env.app.state.engine
    add_events(env, votes(["alice", "bob", "dave"], 36))
    job1 = make_job(env)
    expected1 = selected_ids(env, job1) & user_ids(env, "alice")
    held1 = selected_ids(env, job1, "holdout") & user_ids(env, "alice")
    c1 = add_checkpoint(env, job1["id"], "retired")
    # job2 trains only on later data (bob and dave), from c1's weights
    add_events(env, votes(["bob", "dave"], 20))
    job2 = make_job(env, new_data_only=True)
    assert not selected_ids(env, job2) & user_ids(env, "alice")
    c2 = add_checkpoint(env, job2["id"], "production", parent_id=c1)
    c3 = add_checkpoint(env, None, "candidate", parent_id=c2)  # grandchild
    # a queued job (never started) whose frozen range holds alice's newest events
    add_events(env, votes(["alice", "bob"], 10))
    job3 = make_job(env, status="queued", attempt=0, new_data_only=True)
    expected3 = selected_ids(env, job3) & user_ids(env, "alice")
    assert expected1 and expected3
    n_alice = len(user_ids(env, "alice"))

    with TestClient(env.app, raise_server_exceptions=False) as c:
        r = c.post("/v1/erasures", json={"user_id": "alice", "reason": "GDPR ticket 17"},
                   headers=env.headers("admin"))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["kind"] == "user" and body["n_events"] == n_alice
        assert r.headers["location"] == f"/v1/erasures/{body['id']}"
        links = {j["job_id"]: j for j in body["jobs"]}
        assert links[job1["id"]]["n_trained"] == len(expected1)
        assert links[job1["id"]]["n_held_out"] == len(held1)
        assert links[job1["id"]]["exact"] is True
        assert job2["id"] not in links
        assert links[job3["id"]]["job_status"] == "queued"
        assert links[job3["id"]]["n_trained"] == len(expected3)
        assert not user_ids(env, "alice") and user_ids(env, "bob")

        lin = c.get("/v1/lineage/erased", headers=env.headers("read")).json()
        by_job = {j["job_id"]: j for j in lin["jobs"]}
        assert set(by_job) == {job1["id"]}  # job3 never read the deleted events
        assert by_job[job1["id"]]["verdict"] == "trained"
        assert by_job[job1["id"]]["checkpoints"] == [c1]
        by_ckpt = {x["id"]: x for x in lin["checkpoints"]}
        assert by_ckpt[c1]["verdict"] == "trained" and not by_ckpt[c1]["live"]
        assert by_ckpt[c2]["verdict"] == "inherits" and by_ckpt[c2]["via_checkpoint_id"] == c1
        assert by_ckpt[c3]["verdict"] == "inherits" and by_ckpt[c3]["via_checkpoint_id"] == c2
        assert lin["live_checkpoints"] == [c3, c2]
        full = c.get("/v1/lineage/erased", params={"include_untrained": "true"},
                     headers=env.headers("read")).json()
        assert {j["job_id"]: j["verdict"] for j in full["jobs"]}[job3["id"]] == "not_trained"

        # Repeating the request deletes nothing and links nothing; it is still recorded.
        again = c.post("/v1/erasures", json={"user_hash": hash_user_id(
            "alice", env.settings.user_id_key)}, headers=env.headers("admin")).json()
        assert again["n_events"] == 0 and again["jobs"] == []
        page = c.get("/v1/erasures", params={"limit": 1}, headers=env.headers("admin")).json()
        assert [e["id"] for e in page["erasures"]] == [again["id"]]
        nxt = c.get("/v1/erasures", params={"cursor": page["next_cursor"]},
                    headers=env.headers("admin")).json()
        assert [e["id"] for e in nxt["erasures"]] == [body["id"]]
        one = c.get(f"/v1/erasures/{body['id']}", headers=env.headers("admin")).json()
        assert one["reason"] == "GDPR ticket 17" and one["jobs"] == body["jobs"]
        assert c.get("/v1/erasures/999999", headers=env.headers("admin")).status_code == 404
    with engine.connect() as conn:
        stored = conn.execute(select(erasures.c.user_hash)).scalars().all()
    assert "alice" not in " ".join(s or "" for s in stored)


def test_a_job_started_after_the_erasure_did_not_train_on_it(rights_env):
    env = env_with(rights_env, holdout_fraction=0.0)
    add_events(env, votes(["alice", "bob"], 8))
    job = make_job(env, status="queued", attempt=0)
    res = erasure.erase_user(env.app.state.engine, env.settings,
                             hash_user_id("alice", env.settings.user_id_key), actor="test")
    assert res.jobs[job["id"]].n_trained == 4
    with env.app.state.engine.begin() as conn:  # claimed after the erasure committed
        conn.execute(update(training_jobs).where(training_jobs.c.id == job["id"]).values(
            status="succeeded", attempt=1, started_at=datetime.now(UTC) + timedelta(seconds=1)))
        assert selected_ids(env, job) and not (selected_ids(env, job) & user_ids(env, "alice"))
    with env.app.state.engine.connect() as conn:
        assert erasure.erased_lineage(conn)["jobs"] == []
        # A claim that raced the erasure (started before it completed): "may have".
        conn.execute(update(training_jobs).where(training_jobs.c.id == job["id"])
                     .values(started_at=NOW - timedelta(days=1)))
        [j] = erasure.erased_lineage(conn)["jobs"]
        assert j["verdict"] == "may_have_trained"


@pytest.mark.parametrize("status", ["cancelled", "failed"])
def test_a_job_that_ended_before_it_started_did_not_train(rights_env, status):
    """Cancelled while queued (or failed before any attempt): its selection held the events,
    but it never read them. It was listed as "trained" (a helper's docs audit)."""
    env = env_with(rights_env, holdout_fraction=0.0)
    add_events(env, votes(["alice", "bob"], 8))
    job = make_job(env, status=status, attempt=0)
    with env.app.state.engine.begin() as conn:
        conn.execute(update(training_jobs).where(training_jobs.c.id == job["id"]).values(started_at=None))
    res = erasure.erase_user(env.app.state.engine, env.settings,
                             hash_user_id("alice", env.settings.user_id_key), actor="test")
    assert res.jobs[job["id"]].n_trained == 4
    with env.app.state.engine.connect() as conn:
        assert erasure.erased_lineage(conn)["jobs"] == []
        [j] = erasure.erased_lineage(conn, include_untrained=True)["jobs"]
        assert j["verdict"] == "not_trained"


def test_a_queued_job_holding_only_held_out_events_did_not_see_them(rights_env):
    """A queued job reads its data (and the gate its held-out split) after it starts: events
    erased before that were neither trained on nor scored. It was listed as
    "held_out_only" whenever the erased events were all in its held-out split."""
    from service.selection import split_bucket

    env = env_with(rights_env, holdout_fraction=0.5)
    held = [f"ho-{i}" for i in range(200) if split_bucket(f"ho-{i}") < 5000][:3]
    add_events(env, votes(["bob"], 6))
    add_events(env, [{"user_id": "alice", "event_id": e} for e in held])
    job = make_job(env, status="queued", attempt=0)
    res = erasure.erase_user(env.app.state.engine, env.settings,
                             hash_user_id("alice", env.settings.user_id_key), actor="test")
    impact = res.jobs[job["id"]]
    assert (impact.n_trained, impact.n_held_out) == (0, 3)
    with env.app.state.engine.connect() as conn:
        [j] = erasure.erased_lineage(conn, include_untrained=True)["jobs"]
    assert j["verdict"] == "not_trained"


def test_cap_and_replacement_are_respected(rights_env):
    env = env_with(rights_env, holdout_fraction=0.0, max_events_per_user=3)
    add_events(env, [{"user_id": "bob"} for _ in range(3)] + [{"user_id": "bob", "label": "down"}])
    first = add_events(env, [{"user_id": "alice", "event_id": f"a-{i}"} for i in range(6)])
    # a-6 replaces a-5: a-5 is not trained on, a-6 counts toward the cap instead
    add_events(env, [{"user_id": "alice", "event_id": "a-6", "replaces": "a-5",
                      "label": "down"}])
    job = make_job(env)
    expected = selected_ids(env, job) & user_ids(env, "alice")
    assert len(expected) == 3 and first[5] not in expected
    res = erasure.erase_user(env.app.state.engine, env.settings,
                             hash_user_id("alice", env.settings.user_id_key), actor="test")
    assert res.n_events == 7
    assert res.jobs[job["id"]].n_trained == 3 and res.jobs[job["id"]].exact


def test_reconstruction_after_an_earlier_deletion_is_marked_may_have(rights_env):
    """Retention removed newer events of the job's range after it ran: the cap may have
    left out what now ranks inside it, so the answer is conservative."""
    env = env_with(rights_env, holdout_fraction=0.0, max_events_per_user=2,
                   feedback_retention_days=30)
    engine = env.app.state.engine
    old = (NOW - timedelta(days=40)).isoformat()
    add_events(env, [{"user_id": "alice"}, {"user_id": "alice", "label": "down"}])
    add_events(env, [{"user_id": "alice", "occurred_at": old}])  # newest id, old timestamp
    add_events(env, [{"user_id": "bob"}, {"user_id": "bob", "label": "down"}])
    job = make_job(env)
    assert len(selected_ids(env, job) & user_ids(env, "alice")) == 2
    ret = erasure.apply_retention(engine, env.settings)
    assert ret is not None and ret.n_events == 1 and ret.jobs[job["id"]].n_trained == 1
    res = erasure.erase_user(engine, env.settings,
                             hash_user_id("alice", env.settings.user_id_key), actor="test")
    impact = res.jobs[job["id"]]
    assert impact.n_trained == 2 and not impact.exact  # truly 1; never under-counted
    with engine.connect() as conn:
        [j] = erasure.erased_lineage(conn)["jobs"]
    # certain for the retention run's event, conservative for the rest
    assert j["verdict"] == "trained" and j["n_trained"] == 3 and j["exact"] is False
    # bob's answer stays exact: the retention run deleted only older ids (a newer event's
    # rank counts newer ones) and alice's erasure is another user's
    res = erasure.erase_user(engine, env.settings,
                             hash_user_id("bob", env.settings.user_id_key), actor="test")
    assert res.jobs[job["id"]].n_trained == 2 and res.jobs[job["id"]].exact is True


def test_retention_deletes_old_events_in_chunks_with_exact_lineage(rights_env):
    env = env_with(rights_env, holdout_fraction=0.2, max_events_per_user=5,
                   feedback_retention_days=30)
    engine = env.app.state.engine
    assert erasure.apply_retention(engine, env.make_settings(feedback_retention_days=0)) is None
    old = [(NOW - timedelta(days=31 + i)).isoformat() for i in range(30)]
    add_events(env, [{**v, "occurred_at": old[i]}
                     for i, v in enumerate(votes(["alice", "bob", "carol"], 30))])
    add_events(env, votes(["alice", "bob", "carol"], 9))  # recent: kept
    job = make_job(env)
    train, held = selected_ids(env, job), selected_ids(env, job, "holdout")
    with engine.connect() as conn:
        old_ids = set(conn.execute(select(feedback_events.c.id).where(
            feedback_events.c.occurred_at < NOW - timedelta(days=30))).scalars())
    res = erasure.apply_retention(engine, env.settings, chunk=4)
    assert res is not None and res.n_events == 30
    assert res.jobs[job["id"]].n_trained == len(train & old_ids)
    assert res.jobs[job["id"]].n_held_out == len(held & old_ids)
    assert res.jobs[job["id"]].exact
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(feedback_events)).scalar_one() == 9
        row = conn.execute(select(erasures)).mappings().one()
    assert row["kind"] == "retention" and row["n_events"] == 30 and row["completed_at"]
    assert row["min_event_id"] == min(old_ids) and row["max_event_id"] == max(old_ids)
    # nothing due: no new record
    again = erasure.apply_retention(engine, env.settings)
    assert again is not None and again.erasure_id is None


def test_concurrent_erasures_of_one_user_count_each_event_once(rights_env):
    env = env_with(rights_env, holdout_fraction=0.0)
    add_events(env, votes(["alice", "bob"], 40))
    job = make_job(env)
    h = hash_user_id("alice", env.settings.user_id_key)
    results: list[Any] = []

    def run() -> None:
        results.append(erasure.erase_user(env.app.state.engine, env.settings, h, actor="t"))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.n_events for r in results) == 20
    assert sum(r.jobs[job["id"]].n_trained for r in results if job["id"] in r.jobs) == 20


def test_erasure_request_validation(sec_env):
    with TestClient(sec_env.app, raise_server_exceptions=False) as c:
        h = sec_env.headers("admin")
        for body, field in (({}, "body"), ({"user_id": "a", "user_hash": "0" * 64}, "body"),
                            ({"user_hash": "XYZ"}, "body.user_hash"),
                            ({"user_id": ""}, "body.user_id"),
                            ({"user_id": "a", "extra": 1}, "body.extra")):
            r = c.post("/v1/erasures", json=body, headers=h)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["errors"][0]["field"] == field, (body, r.json())
        for params in ({"cursor": "x"}, {"limit": 0}, {"kind": "other"}):
            assert c.get("/v1/erasures", params=params, headers=h).status_code == 422
        assert c.get("/v1/lineage/erased", params={"line": "Bad Line"},
                     headers=h).status_code == 422


def test_retention_task_is_scheduled_on_the_default_queue():
    from service.erasure import FEEDBACK_RETENTION_TASK
    from service.settings import Settings
    from worker.celery_app import beat_schedule

    assert "feedback-retention" not in beat_schedule(Settings())
    entry = beat_schedule(Settings(feedback_retention_days=90))["feedback-retention"]
    assert entry["task"] == FEEDBACK_RETENTION_TASK
    assert entry["options"]["queue"] == "default"
    import worker.tasks

    assert FEEDBACK_RETENTION_TASK in worker.tasks.app.tasks


@pytest.mark.parametrize("days", [0.0, 30.0])
def test_retention_task_body(tmp_path, sec_template, monkeypatch, days):
    """The Celery task calls apply_retention with the worker's engine and settings."""
    import worker.tasks as tasks
    from tests.security.conftest import sqlite_env

    env = sqlite_env(tmp_path, sec_template, feedback_retention_days=days)
    add_events(env, [{"occurred_at": (NOW - timedelta(days=60)).isoformat()}, {}])
    monkeypatch.setattr(tasks, "_engine", lambda: env.app.state.engine)
    monkeypatch.setattr(tasks, "_settings", lambda: env.settings)
    out = tasks.feedback_retention()
    if days:
        assert out["n_events"] == 1 and out["kind"] == "retention"
    else:
        assert out == {"disabled": True}


def test_an_erased_event_retried_later_is_not_stored_again(rights_env):
    """Ingestion is idempotent on event_id and the key leaves with the row: the erasure keeps
    the ids (hashed), so a client retrying erased events gets "duplicate" and nothing comes
    back, a changed payload under an erased id is not stored either, while new events of the
    same user (erasure is not an opt-out) and other users' events are stored as usual."""
    env = rights_env
    engine = env.app.state.engine
    alice = [event(event_id=f"er-{i}", user_id="alice") for i in range(3)]
    bob = event(event_id="er-bob", user_id="bob")
    with TestClient(env.app, raise_server_exceptions=False) as c:
        r = c.post("/v1/feedback/batch", json=alice + [bob], headers=env.headers("ingest"))
        assert [x["status"] for x in r.json()["results"]] == ["accepted"] * 4, r.text
        r = c.post("/v1/erasures", json={"user_id": "alice"}, headers=env.headers("admin"))
        assert r.status_code == 201 and r.json()["n_events"] == 3, r.text
        assert not user_ids(env, "alice")

        retry = alice + [bob, event(event_id="er-new", user_id="alice")]
        r = c.post("/v1/feedback/batch", json=retry, headers=env.headers("ingest"))
        assert [x["status"] for x in r.json()["results"]] == ["duplicate"] * 4 + ["accepted"], r.text
        r = c.post("/v1/feedback", json=alice[0], headers=env.headers("ingest"))
        assert r.status_code == 200 and r.json()["status"] == "duplicate", r.text
        r = c.post("/v1/feedback", json={**alice[1], "label": "down"}, headers=env.headers("ingest"))
        assert r.status_code == 200 and r.json()["status"] == "duplicate", r.text
    with engine.connect() as conn:
        stored = set(conn.execute(select(feedback_events.c.event_id)).scalars())
        kept = conn.execute(select(erased_event_ids.c.event_id_hash)).scalars().all()
    assert stored == {"er-bob", "er-new"}
    assert sorted(kept) == sorted(event_id_hash(e["event_id"]) for e in alice)
    assert not any("er-" in k for k in kept)  # hashes, not the ids

    # retention keeps no hashes: what it deletes is past the window anyway
    env2 = env_with(env, feedback_retention_days=1.0)
    old = event(event_id="er-old", user_id="carol", occurred_at=(NOW - timedelta(days=3)).isoformat())
    assert ingest_items([old], env.app.state.models["FeedbackIn"], env2.settings, engine)[0].status == "accepted"
    assert erasure.apply_retention(engine, env2.settings).n_events == 1
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(erased_event_ids)).scalar_one() == 3


def test_erase_from_the_command_line(rights_env, monkeypatch):
    """`prospect erase` does what POST /v1/erasures does, recorded with actor "cli"; a request
    naming no user, or two, is refused naming the options."""
    from typer.testing import CliRunner

    from service.cli import app as cli

    env = rights_env
    add_events(env, votes(["dora", "erin"], 6))
    monkeypatch.setenv("PROSPECT_DATABASE_URL", env.url)
    monkeypatch.setenv("PROSPECT_USER_ID_KEY", env.settings.user_id_key)
    runner = CliRunner()
    r = runner.invoke(cli, ["erase", "--user-id", "dora", "--reason", "ticket 9"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["kind"] == "user" and out["n_events"] == 3
    assert not user_ids(env, "dora") and len(user_ids(env, "erin")) == 3
    with env.app.state.engine.connect() as conn:
        row = conn.execute(select(erasures.c.actor, erasures.c.reason)
                           .where(erasures.c.id == out["erasure_id"])).one()
    assert tuple(row) == ("cli", "ticket 9")
    for args in ([], ["--user-id", "erin", "--user-hash", "0" * 64], ["--user-hash", "nothex"]):
        r = runner.invoke(cli, ["erase", *args])
        assert r.exit_code == 2 and ("user_id" in r.output or "user_hash" in r.output), r.output
    assert len(user_ids(env, "erin")) == 3


@pytest.mark.parametrize("days", ["1e6", "inf"])
def test_a_retention_window_no_date_can_hold_is_refused_at_start(days):
    """PROSPECT_FEEDBACK_RETENTION_DAYS past what a date can hold was accepted, and then
    every run of the beat task failed with OverflowError (now - window before year 1)."""
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="feedback_retention_days"):
        Settings(feedback_retention_days=days)


def test_a_thousand_year_retention_window_runs(rights_env):
    env = env_with(rights_env, feedback_retention_days=365_000)
    add_events(env, [{}])
    res = erasure.apply_retention(env.app.state.engine, env.settings)
    assert res is not None and res.n_events == 0
