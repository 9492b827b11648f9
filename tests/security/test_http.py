"""HTTP hardening: CORS closed unless configured, body limits, the dashboard's cookies."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.settings import Settings
from tests.dashboard.conftest import login
from tests.security.conftest import sqlite_env
from tests.service.helpers import event

ORIGIN = "https://app.example.com"


def test_cors_is_closed_by_default(sec_env):
    assert Settings().cors_origins == []
    with TestClient(sec_env.app, raise_server_exceptions=False) as c:
        r = c.post("/v1/feedback", json=event(),
                   headers={**sec_env.headers("ingest"), "Origin": ORIGIN})
        assert r.status_code == 201
        assert not any(k.lower().startswith("access-control-") for k in r.headers)
        pre = c.options("/v1/feedback", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code >= 400
        assert not any(k.lower().startswith("access-control-") for k in pre.headers)


def test_cors_allows_only_the_configured_origins(tmp_path, sec_template, monkeypatch):
    monkeypatch.setenv("PROSPECT_CORS_ORIGINS", f"{ORIGIN}/, https://other.example.com")
    assert Settings().cors_origins == [ORIGIN, "https://other.example.com"]
    env = sqlite_env(tmp_path, sec_template, cors_origins=[ORIGIN],
                     rate_limit_ingest_per_s=0.01, rate_limit_ingest_burst=1)
    with TestClient(env.app, raise_server_exceptions=False) as c:
        pre = c.options("/v1/feedback", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in pre.headers
        h = {**env.headers("ingest"), "Origin": ORIGIN}
        r = c.post("/v1/feedback", json=event(), headers=h)
        assert r.status_code == 201 and r.headers["access-control-allow-origin"] == ORIGIN
        # a browser can read a 429's Retry-After too
        r = c.post("/v1/feedback", json=event(), headers=h)
        assert r.status_code == 429 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "retry-after" in r.headers["access-control-expose-headers"].lower()
        evil = c.post("/v1/feedback", json=event(),
                      headers={**env.headers("admin"), "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in evil.headers
        pre = c.options("/v1/feedback", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 400 and "access-control-allow-origin" not in pre.headers


def test_bodies_over_the_limit_are_413_on_every_write(tmp_path, sec_template):
    env = sqlite_env(tmp_path, sec_template, max_body_bytes=2048)
    big = b'{"events": [' + b'"x",' * 1000 + b'"x"]}'

    def chunks():
        for _ in range(8):
            yield b" " * 512

    with TestClient(env.app, raise_server_exceptions=False) as c:
        for path, scope in (("/v1/feedback", "ingest"), ("/v1/feedback/batch", "ingest"),
                            ("/v1/erasures", "admin"), ("/v1/jobs", "admin")):
            r = c.post(path, content=big, headers={**env.headers(scope),
                                                   "Content-Type": "application/json"})
            assert r.status_code == 413, (path, r.status_code)
            assert r.json()["errors"][0]["field"] == "body"
        # chunked (no Content-Length): refused as soon as it crosses the limit
        r = c.post("/v1/feedback", content=chunks(), headers=env.headers("ingest"))
        assert r.status_code == 413
        # 413 even without a key: the size is checked before anything else
        assert c.post("/v1/feedback", content=big).status_code == 413


def test_dashboard_cookies_are_http_only_and_same_site(tmp_path, sec_template):
    env = sqlite_env(tmp_path, sec_template)
    with TestClient(env.app, base_url="https://testserver",
                    raise_server_exceptions=False) as c:
        form = c.get("/dashboard/login")
        csrf_cookie = [v for k, v in form.headers.multi_items() if k == "set-cookie"]
        r = login(c, env.keys["read"])
        assert r.status_code == 303
        cookies = csrf_cookie + [v for k, v in r.headers.multi_items() if k == "set-cookie"]
    session = [h for h in cookies if h.startswith("prospect_session=")]
    assert session and cookies
    for h in cookies:
        low = h.lower()
        assert "httponly" in low and "samesite=" in low and "secure" in low, h
        assert "path=/dashboard" in low, h
    assert env.keys["read"] not in " ".join(cookies)
