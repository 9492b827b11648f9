"""The JSON endpoints behind the charts, on SQLite and Postgres: exact numbers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from service.balance import compute_weights
from service.dashboard import data
from service.models import feedback_events
from service.queue import GPU_QUEUE, TRAIN_TASK, make_celery, send
from service.rollout_stats import wilson_interval
from tests.dashboard.conftest import login, seed_job, seed_metrics
from tests.service.helpers import event

NOW = datetime.now(UTC)


def _post(client: Any, env: Any, events: list[dict[str, Any]]) -> None:
    r = client.post("/v1/feedback/batch", json={"events": events}, headers=env.headers("ingest"))
    assert r.status_code == 207, r.text
    assert r.json()["accepted"] == len(events), r.json()


def _day(ts: datetime) -> int:
    return int(ts.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())


def _hour(ts: datetime) -> int:
    return int(ts.replace(minute=0, second=0, microsecond=0).timestamp())


def test_balance_series_daily_counts_latest_vote_only(dash_client, dash_env):
    d0 = NOW - timedelta(minutes=5)
    d3 = NOW - timedelta(days=3)
    _post(dash_client, dash_env, [
        *(event(label="up", occurred_at=d0.isoformat()) for _ in range(4)),
        *(event(label="down", occurred_at=d0.isoformat()) for _ in range(2)),
        *(event(label="down", occurred_at=d3.isoformat()) for _ in range(3)),
        event(label="up", occurred_at=(NOW - timedelta(days=45)).isoformat()),
        event(event_id="old-vote", label="up", occurred_at=d3.isoformat()),
        event(label="down", occurred_at=d3.isoformat(), replaces="old-vote"),
    ])
    login(dash_client, dash_env.keys["read"])
    r = dash_client.get("/dashboard/api/balance")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    c = body["counts"]
    assert c["bucket"] == "day" and c["bucket_s"] == 86400
    assert len(c["t"]) in (30, 31) and c["t"] == sorted(c["t"])
    assert all(b - a == 86400 for a, b in zip(c["t"], c["t"][1:], strict=False))
    by_t = {t: (u, d) for t, u, d in zip(c["t"], c["desirable"], c["undesirable"], strict=True)}
    assert by_t[_day(d0)] == (4, 2)
    assert by_t[_day(d3)] == (0, 4)  # the replaced up vote is gone, its replacement counts
    assert sum(c["desirable"]) == 4 and sum(c["undesirable"]) == 6  # 45 days ago: outside
    b = body["balance"]
    w = compute_weights(5, 6, 1.0, 1)
    assert (b["n_desirable"], b["n_undesirable"]) == (5, 6)
    assert (b["lambda_d"], b["lambda_u"], b["allowed"]) == (w.lambda_d, w.lambda_u, True)


def test_balance_series_hourly(dash_client, dash_env):
    h2 = NOW - timedelta(hours=2)
    _post(dash_client, dash_env, [event(label="up", occurred_at=h2.isoformat()),
                                  event(label="down", occurred_at=h2.isoformat()),
                                  event(label="down", occurred_at=NOW.isoformat())])
    login(dash_client, dash_env.keys["read"])
    c = dash_client.get("/dashboard/api/balance?bucket=hour").json()["counts"]
    assert c["bucket_s"] == 3600 and len(c["t"]) in (48, 49)
    by_t = dict(zip(c["t"], zip(c["desirable"], c["undesirable"], strict=True), strict=True))
    assert by_t[_hour(h2)] == (1, 1)
    assert by_t[_hour(NOW)] == (0, 1)
    r = dash_client.get("/dashboard/api/balance?bucket=hour&days=30")
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "days"
    r = dash_client.get("/dashboard/api/balance?bucket=week")
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "query.bucket"


def test_balance_refuses_training_with_an_empty_class(dash_client, dash_env):
    _post(dash_client, dash_env, [event(label="up") for _ in range(3)])
    login(dash_client, dash_env.keys["read"])
    b = dash_client.get("/dashboard/api/balance").json()["balance"]
    assert b["allowed"] is False and "undesirable" in b["reason"]


def test_ingestion_counts_by_arrival_hour(dash_client, dash_env):
    _post(dash_client, dash_env, [event() for _ in range(30)])
    engine = dash_env.app.state.engine
    # Rewrite arrival times: ids stay in arrival order, as in production.
    with engine.begin() as conn:
        ids = [r.id for r in conn.execute(feedback_events.select().order_by(
            feedback_events.c.id)).all()]
        plan = [NOW - timedelta(hours=50)] * 5 + [NOW - timedelta(hours=5)] * 10 + \
            [NOW - timedelta(hours=1)] * 7 + [NOW] * 8
        for i, ts in zip(ids, plan, strict=True):
            conn.execute(update(feedback_events).where(feedback_events.c.id == i)
                         .values(received_at=ts))
        # The binary search finds the first id of the window.
        assert data.first_id_received_since(conn, NOW - timedelta(hours=6)) == ids[5]
        assert data.first_id_received_since(conn, NOW + timedelta(hours=1)) is None
    login(dash_client, dash_env.keys["read"])
    body = dash_client.get("/dashboard/api/ingestion?hours=48").json()
    got = dict(zip(body["t"], body["received"], strict=True))
    assert got[_hour(NOW - timedelta(hours=5))] == 10
    assert got[_hour(NOW - timedelta(hours=1))] == 7
    assert got[_hour(NOW)] == 8 == body["current_hour"]
    assert body["total"] == 25  # the 50-hours-old rows are outside the window
    assert dash_client.get("/dashboard/api/ingestion?hours=0").status_code == 422


def test_status_reports_jobs_queue_and_balance(dash_client, dash_env):
    engine = dash_env.app.state.engine
    running = seed_job(engine, status="running", step=30, total_steps=120)
    seed_job(engine, status="succeeded", step=10, total_steps=10, line="other",
             finished_at=NOW)
    # One real message waiting in the (SQLite) broker's gpu queue.
    celery = make_celery(dash_env.settings)
    before = dash_env.app.state.broker_depth.depth()
    assert send(celery, TRAIN_TASK, [running], queue=GPU_QUEUE)
    celery.close()
    login(dash_client, dash_env.keys["read"])
    s = dash_client.get("/dashboard/api/status").json()
    assert [j["id"] for j in s["active_jobs"]] == [running]
    j = s["active_jobs"][0]
    assert (j["status"], j["step"], j["total_steps"], j["progress"]) == ("running", 30, 120,
                                                                        0.25)
    assert "attempt_token" not in j
    assert s["queue"]["gpu"] == (before or {}).get("gpu", 0) + 1
    assert set(s["queue"]) == {"gpu", "default"}
    assert s["balance"]["allowed"] is False  # no feedback yet
    assert "available" in s["rollout"]


def test_job_metrics_are_columnar_incremental_and_null_safe(dash_client, dash_env):
    engine = dash_env.app.state.engine
    job = seed_job(engine, status="running", step=5, total_steps=10)
    rows = seed_metrics(engine, job, range(1, 6))
    from sqlalchemy import insert

    from service.models import job_metrics

    # A step with a missing metric, a null (Postgres' json has no NaN; SQLite stores one)
    # and a metric the charts do not know.
    kl = float("nan") if dash_env.backend == "sqlite" else None
    with engine.begin() as conn:
        conn.execute(insert(job_metrics).values(
            job_id=job, step=6, attempt=1, created_at=NOW,
            metrics={"step": 6, "loss": 0.5, "kl": kl, "custom/thing": 2}))
    login(dash_client, dash_env.keys["read"])
    body = dash_client.get(f"/dashboard/api/jobs/{job}/metrics").json()
    assert body["step"] == [1, 2, 3, 4, 5, 6]
    assert body["series"]["loss"] == [r["loss"] for r in rows] + [0.5]
    assert body["series"]["kl"][-1] is None
    assert body["series"]["rewards/margins"][-1] is None
    assert body["series"]["custom/thing"] == [None] * 5 + [2.0]
    assert body["job"]["id"] == job and body["job"]["active"] is True
    assert body["next_after_step"] == 6 and body["more"] is False
    page = dash_client.get(f"/dashboard/api/jobs/{job}/metrics?after_step=2&limit=2").json()
    assert page["step"] == [3, 4] and page["more"] is True and page["next_after_step"] == 4
    assert dash_client.get(f"/dashboard/api/jobs/{job}").json()["progress"] == 0.5
    r = dash_client.get("/dashboard/api/jobs/999999/metrics")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = dash_client.get(f"/dashboard/api/jobs/{job}/metrics?after_step=-1")
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "query.after_step"


def test_version_rates_with_wilson_intervals(dash_client, dash_env):
    _post(dash_client, dash_env, [
        *(event(model_version="a", label="up") for _ in range(8)),
        *(event(model_version="a", label="down") for _ in range(2)),
        event(model_version="b", label="down"),
        event(model_version="c", label="up", occurred_at=(NOW - timedelta(days=20)).isoformat()),
    ])
    login(dash_client, dash_env.keys["read"])
    v = dash_client.get("/dashboard/api/versions?days=7").json()["versions"]
    assert [x["model_version"] for x in v] == ["a", "b"]
    a = v[0]
    assert (a["up"], a["n"], a["rate"]) == (8, 10, 0.8)
    assert (a["low"], a["high"]) == wilson_interval(8, 10)
    assert v[1]["rate"] == 0.0


def test_checkpoints_endpoint_degrades_or_lists(dash_client, dash_env):
    login(dash_client, dash_env.keys["read"])
    body = dash_client.get("/dashboard/api/checkpoints").json()
    assert set(body) >= {"available", "checkpoints", "events", "live"}
    if not body["available"]:
        assert "registry" in body["message"]
    page = dash_client.get("/dashboard/checkpoints")
    assert page.status_code == 200 and "Checkpoints and rollout" in page.text


def test_api_endpoints_need_a_session(dash_client):
    for url in ("/dashboard/api/balance", "/dashboard/api/ingestion", "/dashboard/api/status",
                "/dashboard/api/jobs/1", "/dashboard/api/jobs/1/metrics",
                "/dashboard/api/versions", "/dashboard/api/checkpoints"):
        r = dash_client.get(url)
        assert r.status_code == 401, url
        assert r.json()["errors"][0]["field"] == "prospect_session"
