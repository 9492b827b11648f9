"""Per-key token buckets: 429 with Retry-After, per class, per key; shared through Redis."""

from __future__ import annotations

import os
import secrets

import pytest
from fastapi.testclient import TestClient

from service.ratelimit import Limit, LocalBuckets, RateLimiter, classify
from service.settings import Settings
from tests.security.conftest import sqlite_env
from tests.service.helpers import event

REDIS_URL = os.environ.get("PROSPECT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_burst_refill_and_wait():
    clock = Clock()
    b = LocalBuckets(clock)
    lim = Limit(per_s=2.0, burst=3)
    assert [b.take("read", 1, lim).allowed for _ in range(3)] == [True] * 3
    d = b.take("read", 1, lim)
    assert not d.allowed and d.retry_after_s == pytest.approx(0.5)
    assert b.take("read", 2, lim).allowed  # another key has its own bucket
    assert b.take("ingest", 1, lim).allowed  # and another class
    clock.t += 0.5
    assert b.take("read", 1, lim).allowed
    assert not b.take("read", 1, lim).allowed
    clock.t += 100  # refills up to the burst, not beyond
    assert sum(b.take("read", 1, lim).allowed for _ in range(10)) == 3


@pytest.mark.parametrize("method,path,cls", [
    ("POST", "/v1/feedback", "ingest"), ("POST", "/v1/feedback/batch", "ingest"),
    ("POST", "/v1/feedback/import-pairs", "ingest"), ("GET", "/v1/serve", "ingest"),
    ("POST", "/v1/serve", "ingest"), ("GET", "/v1/feedback", "read"),
    ("GET", "/v1/feedback/export", "read"), ("GET", "/v1/lineage/erased", "read"),
    ("POST", "/v1/jobs", "admin"), ("POST", "/v1/erasures", "admin"),
    ("DELETE", "/v1/references/3", "admin"), ("PUT", "/v1/lines/x", "admin"),
    ("GET", "/healthz", None), ("GET", "/metrics", None), ("GET", "/dashboard", None),
    ("OPTIONS", "/v1/feedback", None),
])
def test_classes(method, path, cls):
    assert classify(method, path) == cls


def test_429_with_retry_after_per_key_and_class(tmp_path, sec_template):
    env = sqlite_env(tmp_path, sec_template, rate_limit_ingest_per_s=0.5,
                     rate_limit_ingest_burst=2, rate_limit_read_per_s=0.5,
                     rate_limit_read_burst=1)
    with TestClient(env.app, raise_server_exceptions=False) as c:
        h = env.headers("ingest")
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 201
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 201
        r = c.post("/v1/feedback", json=event(), headers=h)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "2"  # (1 − 0 tokens) / 0.5 per s
        body = r.json()
        assert body["error"] == "rate_limited" and body["errors"][0]["field"] == "Authorization"
        # the admin key has its own ingest bucket; read traffic its own class
        assert c.post("/v1/feedback", json=event(), headers=env.headers("admin")).status_code == 201
        assert c.get("/v1/feedback", headers=env.headers("read")).status_code == 200
        assert c.get("/v1/feedback", headers=env.headers("read")).status_code == 429
        # no key or an unknown key is never counted: auth answers 401, not 429
        for _ in range(3):
            assert c.post("/v1/feedback", json=event()).status_code == 401
            assert c.post("/v1/feedback", json=event(),
                          headers={"Authorization": "Bearer nope"}).status_code == 401
        # health and dashboard are not limited
        assert all(c.get("/healthz").status_code == 200 for _ in range(5))


def test_an_expired_key_is_401_not_429(tmp_path, sec_template):
    """An expired key was counted like a live one: once its bucket ran dry it got 429 with a
    Retry-After, telling the client to wait for a retry that can never succeed."""
    from datetime import UTC, datetime, timedelta

    from service.auth import create_key
    from service.db import make_sessionmaker

    env = sqlite_env(tmp_path, sec_template, rate_limit_ingest_per_s=0.01,
                     rate_limit_ingest_burst=1)
    with make_sessionmaker(env.app.state.engine).begin() as s:
        _, secret = create_key(s, "ingest", expires_at=datetime.now(UTC) - timedelta(days=1))
    with TestClient(env.app, raise_server_exceptions=False) as c:
        for _ in range(3):
            r = c.post("/v1/feedback", json=event(),
                       headers={"Authorization": f"Bearer {secret}"})
            assert r.status_code == 401 and "expired" in r.text


def test_429_comes_before_body_parsing(tmp_path, sec_template):
    """The middleware answers before any handler reads the body: even a body that is not
    JSON gets 429, not 400."""
    env = sqlite_env(tmp_path, sec_template, rate_limit_ingest_per_s=0.1,
                     rate_limit_ingest_burst=1)
    with TestClient(env.app, raise_server_exceptions=False) as c:
        c.post("/v1/feedback", json=event(), headers=env.headers("ingest"))
        r = c.post("/v1/feedback", content=b"{not json", headers=env.headers("ingest"))
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 9


def test_limits_can_be_turned_off(tmp_path, sec_template):
    env = sqlite_env(tmp_path, sec_template, rate_limit_ingest_per_s=0,
                     rate_limit_read_per_s=0, rate_limit_admin_per_s=0,
                     rate_limit_ingest_burst=1, rate_limit_read_burst=1)
    assert not env.app.state.rate_limiter.enabled
    with TestClient(env.app, raise_server_exceptions=False) as c:
        assert all(c.get("/v1/balance", headers=env.headers("read")).status_code == 200
                   for _ in range(5))


def test_defaults_are_generous_for_ingest():
    s = Settings()
    assert s.rate_limit_ingest_per_s >= 1000 and s.rate_limit_ingest_burst >= 2000
    assert 0 < s.rate_limit_admin_per_s <= s.rate_limit_read_per_s <= s.rate_limit_ingest_per_s


@pytest.fixture
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"Redis is required for this test ({REDIS_URL}): {exc}. `.ci/run` starts it.")
    return REDIS_URL


def test_redis_buckets_are_shared_between_processes(tmp_path, sec_template, redis_url):
    """Two apps (two API processes) on one Redis draw from one bucket per key."""
    a = sqlite_env(tmp_path / "a", sec_template, rate_limit_ingest_per_s=0.2,
                   rate_limit_ingest_burst=3, rate_limit_redis_url=redis_url)
    prefix = f"prospect-test:{secrets.token_hex(4)}:"
    a.app.state.rate_limiter.redis.prefix = prefix
    b_app_settings = a.settings
    from service.app import create_app

    b_app = create_app(b_app_settings)
    b_app.state.rate_limiter.redis.prefix = prefix
    h = a.headers("ingest")
    with TestClient(a.app, raise_server_exceptions=False) as ca, \
            TestClient(b_app, raise_server_exceptions=False) as cb:
        codes = [ca.post("/v1/feedback", json=event(), headers=h).status_code,
                 cb.post("/v1/feedback", json=event(), headers=h).status_code,
                 ca.post("/v1/feedback", json=event(), headers=h).status_code,
                 cb.post("/v1/feedback", json=event(), headers=h).status_code]
        assert codes == [201, 201, 201, 429]
        r = ca.post("/v1/feedback", json=event(), headers=h)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 5
    b_app.state.engine.dispose()


def test_redis_down_falls_back_to_local_buckets(tmp_path, sec_template, caplog):
    env = sqlite_env(tmp_path, sec_template, rate_limit_ingest_per_s=0.1,
                     rate_limit_ingest_burst=1, rate_limit_redis_url="redis://127.0.0.1:1/0")
    with TestClient(env.app, raise_server_exceptions=False) as c:
        h = env.headers("ingest")
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 201
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 429
    assert any("rate limit store unavailable" in r.getMessage() for r in caplog.records)


def test_limiter_without_redis_is_per_process():
    limiter = RateLimiter(Settings())
    assert limiter.redis is None and limiter.enabled


def _latency_counts(client: TestClient) -> dict[tuple[str, str, str], float]:
    """prospect_http_request_duration_seconds_count by (method, route, status), from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples
            if s.name == "prospect_http_request_duration_seconds_count"}


def test_429_and_413_are_labelled_by_the_route_they_were_sent_to(tmp_path, sec_template):
    """The rate limiter and the body limit answer before routing, so their 429s and 413s were
    all counted as route="unmatched", mixed into the 404 scans and invisible per route. They
    carry the template the request would have matched now; a path no route knows stays
    unmatched, so the label set stays bounded."""
    env = sqlite_env(tmp_path, sec_template, rate_limit_ingest_per_s=0.01,
                     rate_limit_ingest_burst=1, rate_limit_read_per_s=0.01,
                     rate_limit_read_burst=1, max_body_bytes=1024)
    with TestClient(env.app, raise_server_exceptions=False) as c:
        before = _latency_counts(c)
        h = env.headers("ingest")
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 201
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 429
        # a path parameter: the template, never the raw path
        r = env.headers("read")
        assert c.get("/v1/jobs/777", headers=r).status_code == 404
        assert c.get("/v1/jobs/778", headers=r).status_code == 429
        big = b"[" + b" " * 2000 + b"]"
        json_h = {**env.headers("admin"), "content-type": "application/json"}
        assert c.post("/v1/feedback/batch", content=big, headers=json_h).status_code == 413
        assert c.post("/v1/no-such-route/12345", content=big, headers=json_h).status_code == 413
        assert c.get("/v1/jobs/778/nope", headers=env.headers("admin")).status_code == 404
        after = _latency_counts(c)

    def delta(method: str, route: str, status: str) -> float:
        key = (method, route, status)
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("POST", "/v1/feedback", "429") == 1
    assert delta("GET", "/v1/jobs/{job_id}", "429") == 1
    assert delta("POST", "/v1/feedback/batch", "413") == 1
    assert delta("POST", "unmatched", "413") == 1
    assert delta("GET", "unmatched", "404") == 1
    assert delta("POST", "unmatched", "429") == 0
    assert not any("777" in k[1] or "778" in k[1] or "no-such" in k[1] for k in after)
