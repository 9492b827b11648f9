"""Every route's required scope, proven by calling it: the table below is the contract.

The test walks ``app.routes``: a route that is neither in ``REQUIRED`` nor explicitly public
fails it, so a new endpoint cannot ship without someone deciding (and testing) who may call
it. For each API route: no key and an unknown key are 401, a key without the scope is 403,
a key with it gets past auth (whatever the handler then answers, never 401/403).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.security.conftest import sqlite_env

#: (method, path template) -> the scope it needs; "ingest|read": either (the serving call).
REQUIRED: dict[tuple[str, str], str] = {
    # feedback: frontends write, dashboards and exporters read
    ("POST", "/v1/feedback"): "ingest",
    ("POST", "/v1/feedback/batch"): "ingest",
    ("POST", "/v1/feedback/import-pairs"): "ingest",
    ("GET", "/v1/feedback"): "read",
    ("GET", "/v1/feedback/export"): "read",
    ("GET", "/v1/balance"): "read",
    ("GET", "/v1/balance/daily"): "read",
    # jobs: starting, cancelling and retrying is admin
    ("POST", "/v1/jobs"): "admin",
    ("GET", "/v1/jobs"): "read",
    ("GET", "/v1/jobs/{job_id}"): "read",
    ("GET", "/v1/jobs/{job_id}/metrics"): "read",
    ("POST", "/v1/jobs/{job_id}/cancel"): "admin",
    ("POST", "/v1/jobs/{job_id}/retry"): "admin",
    # π_ref snapshots and model lines
    ("POST", "/v1/references"): "admin",
    ("GET", "/v1/references"): "read",
    ("GET", "/v1/references/{snapshot_id}"): "read",
    ("DELETE", "/v1/references/{snapshot_id}"): "admin",
    ("GET", "/v1/lines"): "read",
    ("PUT", "/v1/lines/{name}"): "admin",
    # registry: checkpoints are read, promotion/reject/rollback/cleanup admin
    ("GET", "/v1/checkpoints"): "read",
    ("GET", "/v1/checkpoints/{checkpoint_id}"): "read",
    ("POST", "/v1/checkpoints/{checkpoint_id}/promote"): "admin",
    ("POST", "/v1/checkpoints/{checkpoint_id}/reject"): "admin",
    ("POST", "/v1/rollback"): "admin",
    ("GET", "/v1/rollout-events"): "read",
    ("GET", "/v1/live"): "read",
    ("GET", "/v1/storage"): "read",
    ("POST", "/v1/storage/cleanup"): "admin",
    ("GET", "/v1/notifications"): "read",
    # the serving call: a frontend (ingest) key or a read key
    ("GET", "/v1/serve"): "ingest|read",
    ("POST", "/v1/serve"): "ingest|read",
    # data rights: erasure and its records are admin; the lineage is read
    ("POST", "/v1/erasures"): "admin",
    ("GET", "/v1/erasures"): "admin",
    ("GET", "/v1/erasures/{erasure_id}"): "admin",
    ("GET", "/v1/lineage/erased"): "read",
}

#: Open on purpose: liveness/readiness probes, the API's own description, Prometheus
#: (PROSPECT_METRICS_REQUIRE_KEY closes it, tested below), and the dashboard's login form.
PUBLIC = {
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"), ("GET", "/dashboard/login"), ("POST", "/dashboard/login"),
}
#: Mounted static files (the dashboard's CSS/JS: no data).
PUBLIC_MOUNTS = {"/dashboard/static"}

SCOPES = ("ingest", "read", "admin")
_PARAM = re.compile(r"\{([^}]+)\}")


def walk_routes(app: Any) -> tuple[set[tuple[str, str]], set[str]]:
    """(method, path) of every endpoint, and the paths of mounts, however FastAPI nests
    included routers (newer versions include them lazily)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI keeps a flat list
        contexts: Any = app.routes
    else:
        contexts = list(iter_route_contexts(app.routes))
    endpoints: set[tuple[str, str]] = set()
    mounts: set[str] = set()
    for r in contexts:
        methods = getattr(r, "methods", None)
        path = r.path
        if methods is None:
            mounts.add(path)
            continue
        for m in methods:
            if m != "HEAD":
                endpoints.add((m, path))
    return endpoints, mounts


def allowed(required: str, scope: str) -> bool:
    return scope == "admin" or scope in required.split("|")


def concrete(path: str) -> str:
    return _PARAM.sub(lambda m: "default" if m.group(1) == "name" else "1", path)


@pytest.fixture(scope="module")
def matrix_env(tmp_path_factory: pytest.TempPathFactory, sec_template: Any) -> Any:
    env = sqlite_env(tmp_path_factory.mktemp("scopes"), sec_template)
    yield env
    env.app.state.engine.dispose()


def test_every_route_has_a_decided_scope(matrix_env):
    endpoints, mounts = walk_routes(matrix_env.app)
    assert len(endpoints) > 30  # the walk found the included routers
    undecided = {e for e in endpoints
                 if e not in REQUIRED and e not in PUBLIC and not e[1].startswith("/dashboard")}
    assert not undecided, f"routes without a scope in tests/security/test_scopes.py: {undecided}"
    stale = set(REQUIRED) - endpoints
    assert not stale, f"REQUIRED names routes that no longer exist: {stale}"
    assert mounts <= PUBLIC_MOUNTS, mounts - PUBLIC_MOUNTS


def _call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    kwargs: dict[str, Any] = {"headers": headers}
    if method in ("POST", "PUT"):
        kwargs["json"] = {}
    return client.request(method, concrete(path), **kwargs)


@pytest.mark.parametrize("method,path", sorted(REQUIRED))
def test_scope_is_enforced(matrix_env, method, path):
    required = REQUIRED[(method, path)]
    with TestClient(matrix_env.app, raise_server_exceptions=False) as c:
        r = _call(c, method, path, {})
        assert r.status_code == 401, (r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        r = _call(c, method, path, {"Authorization": "Bearer prospect_" + "x" * 43})
        assert r.status_code == 401, (r.status_code, r.text)
        for scope in SCOPES:
            r = _call(c, method, path, matrix_env.headers(scope))
            if allowed(required, scope):
                assert r.status_code not in (401, 403), (scope, r.status_code, r.text)
                assert r.status_code < 500, (scope, r.status_code, r.text)
            else:
                assert r.status_code == 403, (scope, r.status_code, r.text)
                assert r.json()["errors"][0]["field"] == "Authorization"


def test_ingest_key_cannot_read_start_promote_or_see_checkpoints(matrix_env):
    """The issue's examples, spelled out: a leaked frontend key is worth little."""
    h = matrix_env.headers("ingest")
    with TestClient(matrix_env.app, raise_server_exceptions=False) as c:
        assert c.get("/v1/feedback", headers=h).status_code == 403
        assert c.get("/v1/feedback/export", headers=h).status_code == 403
        assert c.post("/v1/jobs", json={}, headers=h).status_code == 403
        assert c.post("/v1/checkpoints/1/promote", json={"stage": "production"},
                      headers=h).status_code == 403
        assert c.post("/v1/rollback", json={}, headers=h).status_code == 403
        assert c.get("/v1/checkpoints", headers=h).status_code == 403
        assert c.get("/v1/lineage/erased", headers=h).status_code == 403
        assert c.post("/v1/erasures", json={"user_id": "u"}, headers=h).status_code == 403
        # read keys cannot write telemetry or change state
        r = matrix_env.headers("read")
        assert c.post("/v1/feedback", json={}, headers=r).status_code == 403
        assert c.post("/v1/jobs/1/cancel", headers=r).status_code == 403
        assert c.post("/v1/jobs/1/retry", headers=r).status_code == 403
        assert c.post("/v1/storage/cleanup", json={}, headers=r).status_code == 403
        assert c.post("/v1/erasures", json={"user_id": "u"}, headers=r).status_code == 403


def test_public_routes_need_no_key(matrix_env):
    with TestClient(matrix_env.app, raise_server_exceptions=False) as c:
        for method, path in sorted(PUBLIC):
            if method != "GET":
                continue
            r = c.get(path)
            assert r.status_code == 200, (path, r.status_code)


def test_dashboard_routes_need_a_session(matrix_env):
    """Dashboard pages redirect to the login form; its JSON endpoints answer 401."""
    endpoints, _ = walk_routes(matrix_env.app)
    dash = sorted(e for e in endpoints if e[1].startswith("/dashboard") and e not in PUBLIC)
    assert dash
    with TestClient(matrix_env.app, base_url="https://testserver",
                    raise_server_exceptions=False) as c:
        for method, path in dash:
            r = c.request(method, concrete(path), follow_redirects=False,
                          headers=matrix_env.headers("admin"))  # a key header is no session
            assert r.status_code in (303, 401), (method, path, r.status_code)
            if r.status_code == 303:
                assert r.headers["location"].startswith("/dashboard/login")


def test_metrics_can_require_a_read_key(tmp_path, sec_template):
    env = sqlite_env(tmp_path, sec_template, metrics_require_key=True)
    with TestClient(env.app, raise_server_exceptions=False) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=env.headers("ingest")).status_code == 403
        assert c.get("/metrics", headers=env.headers("read")).status_code == 200
