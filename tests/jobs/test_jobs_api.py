"""/v1/jobs without a worker: validation, refusals with the balancer's reason, scopes,
pagination, and the one-active-job-per-line rule under concurrent callers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from service import jobs
from tests.jobs.conftest import seed_feedback


def _post(client, env, body, scope="admin"):
    return client.post("/v1/jobs", json=body, headers=env.headers(scope))


@pytest.mark.parametrize("body,field", [
    ({"params": {"beta": 0}}, "params.beta"),
    ({"params": {"learning_rate": 5}}, "params.learning_rate"),
    ({"params": {"lambda_d": 1.5}}, "lambda_u"),
    ({"params": {"lambda_d": 1, "lambda_u": 1, "target_ratio": 1.2}}, "target_ratio"),
    ({"params": {"target_ratio": 2.0}}, "params.target_ratio"),
    ({"params": {"microbatch_size": 0}}, "params.microbatch_size"),
    ({"params": {"max_length": 64, "max_prompt_length": 64}}, "max_prompt_length"),
    ({"params": {"bogus": 1}}, "params.bogus"),
    ({"params": {"pack_bucket": 1000}}, "params.pack_bucket"),
    ({"params": {"pack_bucket": -16}}, "params.pack_bucket"),
    ({"params": {"lm_head_grad_cache_gib": -1}}, "params.lm_head_grad_cache_gib"),
    ({"params": {"cuda_graphs": "maybe"}}, "params.cuda_graphs"),
    ({"filters": {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}}, "until"),
    ({"filters": {"since": "yesterday"}}, "filters.since"),
    ({"line": "Bad Line!"}, "line"),
    ({"unexpected": True}, "unexpected"),
])
def test_invalid_parameters_name_the_field(jclient, jenv, body, field):
    r = _post(jclient, jenv, body)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"], r.json()


def test_empty_class_is_refused_with_the_reason(jclient, jenv):
    seed_feedback(jclient, jenv, n=30, desirable_fraction=0.0)
    r = _post(jclient, jenv, {})
    assert r.status_code == 409
    body = r.json()
    assert body["error"] == "cannot_train"
    assert "desirable" in body["message"] and body["errors"][0]["field"] == "filters"
    assert jclient.get("/v1/jobs", headers=jenv.headers("read")).json()["jobs"] == []


def test_too_few_users_is_refused(jclient, jenv):
    seed_feedback(jclient, jenv, n=30, users=1)
    app_settings = jenv.app.state.settings
    jenv.app.state.settings = app_settings.model_copy(update={"min_distinct_users": 3})
    try:
        r = _post(jclient, jenv, {})
    finally:
        jenv.app.state.settings = app_settings
    assert r.status_code == 409 and r.json()["error"] == "too_few_users"
    assert "1 distinct users" in r.json()["message"]


def test_scopes(jclient, jenv):
    seed_feedback(jclient, jenv, n=30)
    assert _post(jclient, jenv, {}, scope="read").status_code == 403
    assert _post(jclient, jenv, {}, scope="ingest").status_code == 403
    assert jclient.post("/v1/jobs", json={}).status_code == 401
    assert jclient.get("/v1/jobs", headers=jenv.headers("ingest")).status_code == 403
    created = _post(jclient, jenv, {}).json()
    assert jclient.post(f"/v1/jobs/{created['id']}/cancel",
                        headers=jenv.headers("read")).status_code == 403


def test_created_job_records_its_data(jclient, jenv):
    seed_feedback(jclient, jenv, n=100, desirable_fraction=0.25)
    r = _post(jclient, jenv, {"params": {"max_steps": 3}})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = r.json()
    assert job["status"] == "queued" and job["trigger"] == "api"
    assert job["n_desirable"] + job["n_undesirable"] <= 100
    assert job["n_desirable"] < job["n_undesirable"]
    # Balancer: the minority class is raised so λD·nD = λU·nU (target 1).
    assert job["lambda_u"] == 1.0
    assert job["lambda_d"] * job["n_desirable"] == pytest.approx(job["n_undesirable"])
    assert job["max_event_id"] > 0 and job["min_event_id"] == 0
    assert job["data"]["holdout_fraction"] == 0.05


def test_explicit_lambdas_are_used(jclient, jenv):
    seed_feedback(jclient, jenv, n=60)
    job = _post(jclient, jenv, {"params": {"lambda_d": 1.33, "lambda_u": 1.0}}).json()
    assert (job["lambda_d"], job["lambda_u"]) == (1.33, 1.0)
    assert job["data"]["lambda_source"] == "explicit"


def test_one_active_job_per_line_under_concurrency(jclient, jenv):
    seed_feedback(jclient, jenv, n=60)
    barrier = threading.Barrier(8)

    def post(_):
        barrier.wait()
        return _post(jclient, jenv, {}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(post, range(8)))
    assert codes == [202] + [409] * 7
    r = _post(jclient, jenv, {})
    assert r.status_code == 409 and r.json()["error"] == "line_busy"
    listed = jclient.get("/v1/jobs", headers=jenv.headers("read")).json()["jobs"]
    assert len(listed) == 1


def test_scheduled_check_enqueues_exactly_one_job(jclient, jenv):
    seed_feedback(jclient, jenv, n=60)
    engine = jenv.app.state.engine
    barrier = threading.Barrier(6)

    def check(_):
        barrier.wait()
        return jobs.check_retraining(engine, jenv.settings, "default").job_id

    with ThreadPoolExecutor(6) as pool:
        made = [j for j in pool.map(check, range(6)) if j is not None]
    assert len(made) == 1
    listed = jclient.get("/v1/jobs", headers=jenv.headers("read")).json()["jobs"]
    assert [j["id"] for j in listed] == made and listed[0]["trigger"] == "schedule"
    assert listed[0]["filters"]["new_data_only"] is True


def test_scheduled_check_waits_for_enough_new_feedback(jclient, jenv):
    engine = jenv.app.state.engine
    seed_feedback(jclient, jenv, n=10)
    d = jobs.check_retraining(engine, jenv.settings, "default")
    assert d.job_id is None and "needed" in d.reason
    seed_feedback(jclient, jenv, n=40, seed=1)
    d = jobs.check_retraining(engine, jenv.settings, "default")
    assert d.job_id is not None
    # Once that job succeeded, only feedback after its frozen range counts as new.
    c = jobs.claim(engine, d.job_id, "h", jenv.settings)
    assert jobs.finish(engine, c, "succeeded", result={})
    d2 = jobs.check_retraining(engine, jenv.settings, "default")
    assert d2.job_id is None and d2.reason.startswith("0 new events")
    seed_feedback(jclient, jenv, n=40, seed=2)
    d3 = jobs.check_retraining(engine, jenv.settings, "default")
    assert d3.job_id is not None
    with engine.connect() as conn:
        job = jobs.get_job(conn, d3.job_id)
        first = jobs.get_job(conn, d.job_id)
    assert job["min_event_id"] == first["max_event_id"]
    assert job["n_desirable"] + job["n_undesirable"] <= 40


def test_scheduled_check_backs_off_after_failed_jobs(jclient, jenv):
    """New data is counted from the last *successful* job, so a line whose jobs kept failing
    had a new job queued at every check, burning a GPU forever. Now each consecutive failure
    doubles the wait; a job an operator cancelled is not a failure."""
    from sqlalchemy import update

    from service.models import training_jobs as tj

    engine = jenv.app.state.engine
    settings = jenv.settings.model_copy(update={"retrain_failure_backoff_s": 600.0})
    seed_feedback(jclient, jenv, n=60)

    def check():
        return jobs.check_retraining(engine, settings, "default")

    def fail(job_id, ago_s):
        c = jobs.claim(engine, job_id, "h", settings)
        assert jobs.finish(engine, c, "failed", error="boom")
        with engine.begin() as conn:
            conn.execute(update(tj).where(tj.c.id == job_id).values(
                finished_at=datetime.now(UTC) - timedelta(seconds=ago_s)))

    first = check().job_id
    assert first is not None
    fail(first, 0)
    d = check()
    assert d.job_id is None and "1 consecutive failed job" in d.reason
    # (each job finishes after the one before: the streak follows the order they finished)
    fail_time = datetime.now(UTC) - timedelta(seconds=1300)
    with engine.begin() as conn:
        conn.execute(update(tj).where(tj.c.id == first).values(finished_at=fail_time))
    second = check().job_id  # the first wait is over
    assert second is not None
    fail(second, 900)  # 2 failures: 1200 s
    d = check()
    assert d.job_id is None and "2 consecutive failed job" in d.reason
    with engine.begin() as conn:
        conn.execute(update(tj).where(tj.c.id == second).values(
            finished_at=datetime.now(UTC) - timedelta(seconds=1205)))
    third = check().job_id
    assert third is not None
    assert jobs.request_cancel(engine, third)["status"] == "cancelled"  # an operator's call
    assert check().job_id is not None


def test_listing_pagination_and_filters(jclient, jenv):
    seed_feedback(jclient, jenv, n=40)
    engine = jenv.app.state.engine
    ids = []
    for _ in range(5):
        created = _post(jclient, jenv, {}).json()
        ids.append(created["id"])
        jobs.request_cancel(engine, created["id"])
    page1 = jclient.get("/v1/jobs", params={"limit": 2}, headers=jenv.headers("read")).json()
    page2 = jclient.get("/v1/jobs", params={"limit": 2, "cursor": page1["next_cursor"]},
                        headers=jenv.headers("read")).json()
    page3 = jclient.get("/v1/jobs", params={"limit": 2, "cursor": page2["next_cursor"]},
                        headers=jenv.headers("read")).json()
    got = [j["id"] for p in (page1, page2, page3) for j in p["jobs"]]
    assert got == sorted(ids, reverse=True) and page3["next_cursor"] is None
    assert jclient.get("/v1/jobs", params={"status": "running"},
                       headers=jenv.headers("read")).json()["jobs"] == []
    r = jclient.get("/v1/jobs", params={"status": "exploded"}, headers=jenv.headers("read"))
    assert r.status_code == 422 and "status" in r.json()["message"]
    for bad in ("abc", "1180591620717411303424", "-1"):
        r = jclient.get("/v1/jobs", params={"cursor": bad}, headers=jenv.headers("read"))
        assert r.status_code == 422 and "cursor" in r.json()["message"], bad


def test_unknown_job_and_line(jclient, jenv):
    h = jenv.headers("read")
    assert jclient.get("/v1/jobs/999999", headers=h).status_code == 404
    assert jclient.get("/v1/jobs/999999/metrics", headers=h).status_code == 404
    assert jclient.get("/v1/jobs/0", headers=h).status_code == 422
    assert jclient.post("/v1/jobs/999999/cancel", headers=jenv.headers("admin")).status_code == 404
    r = _post(jclient, jenv, {"line": "nonexistent"})
    assert r.status_code == 404 and r.json()["errors"][0]["field"] == "line"


def test_broker_down_still_queues_the_job(jclient, jenv):
    """The row is the truth: with the broker unreachable the job is queued, unsent, and the
    reconciler will send it later."""
    from service.queue import make_celery

    seed_feedback(jclient, jenv, n=40)
    good = jenv.app.state.celery
    jenv.app.state.celery = make_celery(jenv.settings.model_copy(
        update={"broker_url": "redis://127.0.0.1:1/0"}))
    try:
        r = _post(jclient, jenv, {})
    finally:
        jenv.app.state.celery = good
    assert r.status_code == 202 and r.json()["enqueued"] is False
    report = jobs.reconcile(jenv.app.state.engine, jenv.settings)
    assert report.to_send == [r.json()["id"]]


def test_an_api_cancel_names_the_key_in_the_log(jclient, jenv, caplog):
    """Who stopped a job: the dashboard's cancel logged the key, the API's did not."""
    import logging

    seed_feedback(jclient, jenv, n=30)
    created = _post(jclient, jenv, {}).json()
    with caplog.at_level(logging.INFO, logger="prospect.jobs"):
        r = jclient.post(f"/v1/jobs/{created['id']}/cancel", headers=jenv.headers("admin"))
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    rec = [x for x in caplog.records if x.getMessage() == "job cancel requested"]
    assert len(rec) == 1 and rec[0].job_id == created["id"] and rec[0].outcome == "cancelled"
    assert isinstance(rec[0].key_id, int) and rec[0].key_id > 0
