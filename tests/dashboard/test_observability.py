"""Prometheus /metrics, request ids and the JSON logs (and what they must never contain)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from service.logging_setup import JsonFormatter, request_id_var, scrub
from service.queue import DEFAULT_QUEUE, make_celery, send
from tests.dashboard.conftest import ROOT, free_port, seed_job, seed_metrics
from tests.service.helpers import event


def scrape(client: Any, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics", headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_feedback_outcomes_are_counted_by_reason(dash_client, dash_env):
    ev = "prospect_feedback_events_total"
    before = scrape(dash_client)
    h = dash_env.headers("ingest")
    one = event()
    assert dash_client.post("/v1/feedback", json=one, headers=h).status_code == 201
    assert dash_client.post("/v1/feedback", json=one, headers=h).status_code == 200
    assert dash_client.post("/v1/feedback", json={**one, "completion": "changed"},
                            headers=h).status_code == 409
    bad = event()
    del bad["label"]
    assert dash_client.post("/v1/feedback", json=bad, headers=h).status_code == 422
    r = dash_client.post("/v1/feedback/batch", headers=h, json={"events": [
        event(), event(), event(prompt=""), event(nonsense_field=1), 5]})
    assert r.status_code == 207
    assert dash_client.post("/v1/feedback/batch", content=b"{nope", headers={
        **h, "content-type": "application/json"}).status_code == 400
    r = dash_client.post("/v1/feedback/import-pairs", headers=h, json={"pairs": [
        {"prompt": "p", "chosen": "a", "rejected": "b", "model_version": "m"},
        {"prompt": "p", "chosen": "a"}]})
    assert r.status_code == 207
    after = scrape(dash_client)

    def delta(name: str, **labels: str) -> float:
        return val(after, name, **labels) - val(before, name, **labels)

    assert delta(ev, outcome="accepted", reason="") == 1 + 2 + 2
    assert delta(ev, outcome="duplicate", reason="") == 1
    assert delta(ev, outcome="conflict", reason="event_id") == 1
    assert delta(ev, outcome="rejected", reason="label") == 1
    assert delta(ev, outcome="rejected", reason="prompt") == 1
    assert delta(ev, outcome="rejected", reason="unknown_field") == 1
    assert delta(ev, outcome="rejected", reason="body") == 1
    assert delta(ev, outcome="rejected", reason="rejected") == 1  # the pair missing "rejected"
    assert delta("prospect_feedback_requests_rejected_total", error="invalid_json") == 1
    # A single event's 422/409 counts as an event, not also as a rejected request.
    assert delta("prospect_feedback_requests_rejected_total", error="invalid") == 0
    assert delta("prospect_feedback_requests_rejected_total", error="conflict") == 0


def test_latency_is_labelled_by_route_template(dash_client, dash_env):
    before = scrape(dash_client)
    for i in (101, 102, 103):
        assert dash_client.get(f"/v1/jobs/{i}", headers=dash_env.headers("read")
                               ).status_code == 404
    dash_client.get("/no/such/path")
    after = scrape(dash_client)
    name = "prospect_http_request_duration_seconds_count"
    lab = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "404"}
    assert val(after, name, **lab) - val(before, name, **lab) == 3
    assert not any("/v1/jobs/101" in str(k) for k in after)
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert val(after, name, **unmatched) - val(before, name, **unmatched) == 1


def test_latency_method_label_is_bounded(dash_client, dash_env):
    """Any token is a valid HTTP method to h11: the raw method as a label let a client mint a
    new histogram series (14 samples each) per request."""
    name = "prospect_http_request_duration_seconds_count"
    before = scrape(dash_client)
    for i in range(3):
        assert dash_client.request(f"JUNK{i}", "/healthz").status_code == 405
    after = scrape(dash_client)
    assert not any("JUNK" in str(k) for k in after)
    lab = {"method": "other", "route": "/healthz", "status": "405"}
    assert val(after, name, **lab) - val(before, name, **lab) == 3


def test_static_files_are_labelled_by_their_mount_not_unmatched(dash_client):
    """FastAPI's router names no route for a mount: every stylesheet and script a page loads
    was counted as route="unmatched" with status 200, mixed into the 404 scans."""
    name = "prospect_http_request_duration_seconds_count"
    before = scrape(dash_client)
    assert dash_client.get("/dashboard/static/dashboard.js").status_code == 200
    assert dash_client.get("/dashboard/static/no-such.js").status_code == 404
    after = scrape(dash_client)
    for status in ("200", "404"):
        lab = {"method": "GET", "route": "/dashboard/static", "status": status}
        assert val(after, name, **lab) - val(before, name, **lab) == 1, status
        lab = {"method": "GET", "route": "unmatched", "status": status}
        assert val(after, name, **lab) - val(before, name, **lab) == 0, status


def test_would_match_names_only_the_apps_own_templates():
    """The label for answers given before routing (429, 413): a full match, else a partial
    one (wrong method), else None; plain Starlette routes (a flat app.routes) work too."""
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from service.observability import would_match

    async def ok(_request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    routes = [Route("/v1/things/{thing_id}", ok, methods=["GET"]),
              Route("/v1/things", ok, methods=["POST"]),
              Mount("/static", app=ok)]

    def scope(method: str, path: str) -> dict[str, Any]:
        return {"type": "http", "method": method, "path": path, "root_path": "",
                "headers": [], "query_string": b""}

    probe = scope("GET", "/v1/things/42")
    assert would_match(routes, probe) == "/v1/things/{thing_id}"
    assert "path_params" not in probe and "route" not in probe  # the real scope is untouched
    assert would_match(routes, scope("DELETE", "/v1/things")) == "/v1/things"
    assert would_match(routes, scope("GET", "/static/app.js")) == "/static"
    assert would_match(routes, scope("GET", "/v1/things/42/extra")) is None
    assert would_match(routes, scope("POST", "/wp-login.php")) is None


def test_job_and_queue_state_is_computed_on_scrape(dash_client, dash_env):
    engine = dash_env.app.state.engine
    t0 = datetime.now(UTC) - timedelta(hours=2)
    running = seed_job(engine, status="running", step=7, total_steps=50)
    seed_metrics(engine, running, range(1, 8))
    seed_job(engine, status="succeeded", line="other", started_at=t0,
             finished_at=t0 + timedelta(seconds=1200))
    seed_job(engine, status="failed", line="third", started_at=t0,
             finished_at=t0 + timedelta(seconds=30))
    seed_job(engine, status="cancelled", line="fourth", started_at=None)  # never started
    celery = make_celery(dash_env.settings)
    depth0 = dash_env.app.state.broker_depth.depth() or {}
    assert send(celery, "prospect.noop", [], queue=DEFAULT_QUEUE)
    assert send(celery, "prospect.noop", [], queue=DEFAULT_QUEUE)
    celery.close()
    m = scrape(dash_client)
    assert val(m, "prospect_state_up") == 1
    for status, n in {"running": 1, "succeeded": 1, "failed": 1, "cancelled": 1,
                      "queued": 0}.items():
        assert val(m, "prospect_jobs", status=status) == n, status
    h = "prospect_job_duration_seconds"
    assert val(m, h + "_count", status="succeeded") == 1
    assert val(m, h + "_sum", status="succeeded") == pytest.approx(1200)
    assert val(m, h + "_bucket", status="succeeded", le="900.0") == 0
    assert val(m, h + "_bucket", status="succeeded", le="1800.0") == 1
    assert val(m, h + "_bucket", status="failed", le="60.0") == 1
    assert val(m, h + "_count", status="cancelled") == 0  # no start time: no duration
    labels = {"line": "default", "job_id": str(running)}
    assert val(m, "prospect_training_tokens_per_second", **labels) == 1007.0
    assert val(m, "prospect_job_step", **labels) == 7
    assert val(m, "prospect_job_total_steps", **labels) == 50
    assert val(m, "prospect_queue_depth", queue="default") == depth0.get("default", 0) + 2
    assert ("prospect_queue_depth", (("queue", "gpu"),)) in m


def test_state_collector_reports_down_instead_of_failing(dash_env):
    from service.observability import BrokerDepth, StateCollector, metrics_payload
    from service.settings import Settings
    from service.db import make_engine

    dead = make_engine(Settings(database_url="postgresql://nobody@127.0.0.1:1/none",
                                db_connect_timeout_s=1))
    broker = BrokerDepth(Settings(broker_url="redis://127.0.0.1:1/0"))
    body = metrics_payload(StateCollector(dead, broker)).decode()
    assert "prospect_state_up 0.0" in body
    assert broker.depth() is None


def test_metrics_can_require_a_read_key(dash_env):
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(dash_env.make_settings(metrics_require_key=True))
    with TestClient(app) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=dash_env.headers("ingest")).status_code == 403
        assert c.get("/metrics", headers=dash_env.headers("read")).status_code == 200


@pytest.fixture
def captured_logs() -> Any:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    yield buf
    root.removeHandler(handler)


def test_request_ids_and_json_access_lines(dash_client, dash_env, captured_logs):
    r = dash_client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = dash_client.get("/healthz", headers={"X-Request-ID": "bad id\twith junk"})
    generated = r.headers["x-request-id"]
    assert len(generated) == 32 and generated != "bad id\twith junk"
    lines = [json.loads(x) for x in captured_logs.getvalue().splitlines()]
    access = [x for x in lines if x["logger"] == "prospect.access"]
    assert [a["request_id"] for a in access] == ["abc-123", generated]
    a = access[0]
    assert (a["method"], a["route"], a["status"]) == ("GET", "/healthz", 200)
    assert isinstance(a["duration_ms"], float) and a["level"] == "info"


def test_logs_carry_no_prompts_user_ids_or_keys(dash_client, dash_env, captured_logs):
    secret_prompt = "my very private prompt 4711"
    user = "carol.secret@example.com"
    h = dash_env.headers("ingest")
    dash_client.post("/v1/feedback", json=event(prompt=secret_prompt, user_id=user), headers=h)
    dash_client.post("/v1/feedback", json=event(prompt=secret_prompt, label="maybe"), headers=h)
    dash_client.get(f"/v1/feedback?model_version={user}", headers=dash_env.headers("read"))
    dash_client.get("/v1/balance", headers={"Authorization": "Bearer prospect_" + "z" * 43})
    from tests.dashboard.conftest import login

    login(dash_client, dash_env.keys["read"])
    login(dash_client, "prospect_wrong" + "q" * 40)
    # The server side's lines (the test client's own httpx lines show its request URLs).
    logged = "\n".join(x for x in captured_logs.getvalue().splitlines()
                       if not json.loads(x)["logger"].startswith("httpx"))
    assert logged, "nothing was logged"
    for secret in (secret_prompt, user, *dash_env.keys.values(), "z" * 43, "q" * 40):
        assert secret not in logged, secret
    assert "GET /v1/feedback 200" in logged  # the path without its query string


def test_scrub_and_sql_parameters_are_hidden():
    assert scrub("key=prospect_abcdefghijklmnopqrstuvwxyz012345") == \
        "key=prospect_[redacted]"
    from sqlalchemy import create_engine

    engine = create_engine("sqlite://")
    value = "private " + "prompt"  # built at run time: the traceback quotes source lines
    try:
        with engine.connect() as conn:
            conn.execute(text("INSERT INTO nowhere VALUES (:p)"), {"p": value})
    except Exception:  # noqa: BLE001
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "db failed", (),
                                sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "private prompt" not in line and "INSERT INTO nowhere" in line
    token = request_id_var.set("rid-1")
    try:
        assert json.loads(JsonFormatter().format(logging.LogRecord(
            "x", logging.INFO, __file__, 1, "hi %s", ("there",), None))) | {"ts": 0} == {
            "ts": 0, "level": "info", "logger": "x", "msg": "hi there", "request_id": "rid-1"}
    finally:
        request_id_var.reset(token)


@pytest.mark.slow
def test_gunicorn_workers_share_counters_in_multiprocess_mode(dash_pg_url, tmp_path):
    """The documented deployment: PROMETHEUS_MULTIPROC_DIR + gunicorn with 2 workers on
    Postgres. Every scrape, whichever worker answers it, reports the sum over both."""
    from tests.conftest import make_env

    dash_env = make_env("postgres", dash_pg_url, broker_url=f"sqla+sqlite:///{tmp_path}/b.db")
    mp = tmp_path / "prom"
    mp.mkdir()
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp),
           "PROSPECT_DATABASE_URL": dash_env.url,
           "PROSPECT_USER_ID_KEY": dash_env.settings.user_id_key,
           "PROSPECT_BROKER_URL": dash_env.settings.broker_url, "PROSPECT_LOG_FORMAT": "none"}
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "service.app:create_app()", "--worker-class",
         "uvicorn_worker.UvicornWorker", "--workers", "2", "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "gunicorn.log").read_text()[-3000:]
            time.sleep(0.2)
        n = 40
        with httpx.Client(base_url=url, headers=dash_env.headers("ingest"), timeout=10) as c:
            for _ in range(n):  # new connections: spread over both workers
                r = httpx.post(url + "/v1/feedback", json=event(),
                               headers=dash_env.headers("ingest"), timeout=10)
                assert r.status_code == 201
            pids = {p.name.split("_")[-1] for p in mp.glob("*.db")}
            assert len(pids) >= 2, pids  # both workers wrote their files
            for _ in range(6):
                m = {}
                for fam in text_string_to_metric_families(c.get("/metrics").text):
                    for s in fam.samples:
                        m[(s.name, tuple(sorted(s.labels.items())))] = s.value
                assert val(m, "prospect_feedback_events_total", outcome="accepted",
                           reason="") == n
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_client_disconnect_is_499_not_a_server_error(caplog):
    """A client that hangs up mid-body is not a 5xx: logged as 499, nothing raised."""
    import asyncio
    import logging

    from starlette.requests import ClientDisconnect

    from service.observability import RequestContextMiddleware

    async def app(scope, receive, send):
        raise ClientDisconnect()

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise AssertionError("nothing may be sent to a client that is gone")

    scope = {"type": "http", "method": "POST", "path": "/v1/feedback", "headers": []}
    import threading

    def run() -> None:  # own thread: another test's event loop may run in this one
        asyncio.run(RequestContextMiddleware(app)(scope, receive, send))

    with caplog.at_level(logging.INFO, logger="prospect.access"):
        t = threading.Thread(target=run)
        t.start()
        t.join(30)
    access = [r for r in caplog.records if r.name == "prospect.access"]
    assert access and all(r.levelno < logging.ERROR for r in access)
    assert any("499" in r.getMessage() for r in access)


def test_a_500_still_carries_its_request_id(dash_env, captured_logs):
    """Starlette answers an unhandled error outside the request middleware: the 500 lacked
    the X-Request-ID that the traceback's log line is filed under."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(dash_env.make_settings())

    @app.get("/boom-for-test")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom-for-test", headers={"X-Request-ID": "rid-500"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "rid-500"
    lines = [json.loads(x) for x in captured_logs.getvalue().splitlines()]
    [access] = [x for x in lines if x["logger"] == "prospect.access"
                and x["route"] == "/boom-for-test"]
    assert access["request_id"] == "rid-500" and access["status"] == 500
    assert "RuntimeError: a bug" in access["exc"]
