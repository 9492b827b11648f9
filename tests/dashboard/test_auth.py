"""Dashboard login, session cookie, CSRF and the admin-only cancel and retry."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from sqlalchemy import select

from service.auth import create_key, revoke_key
from service.dashboard.session import Signer
from service.db import make_sessionmaker
from service.models import training_jobs
from tests.dashboard.conftest import csrf_of, login, seed_job


def _cookie_header(resp, name: str) -> str:
    [h] = [v for k, v in resp.headers.multi_items()
           if k == "set-cookie" and v.startswith(name + "=")]
    return h


def _set_session(client, value: str) -> None:
    client.cookies.clear()
    client.cookies.set("prospect_session", value, domain="testserver", path="/dashboard")


def test_pages_redirect_to_login_with_next(dash_client):
    for path in ("/dashboard", "/dashboard/jobs?status=failed", "/dashboard/jobs/3",
                 "/dashboard/checkpoints"):
        r = dash_client.get(path, follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/dashboard/login?next=/dashboard")
    r = dash_client.get("/dashboard/jobs?status=failed", follow_redirects=False)
    assert r.headers["location"] == "/dashboard/login?next=/dashboard/jobs%3Fstatus%3Dfailed"


def test_login_sets_a_hardened_session_cookie(dash_client, dash_env):
    r = login(dash_client, dash_env.keys["read"], "/dashboard/jobs")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/jobs"
    h = _cookie_header(r, "prospect_session").lower()
    for attr in ("httponly", "secure", "samesite=lax", "path=/dashboard", "max-age=43200"):
        assert attr in h, h
    assert dash_env.keys["read"] not in r.headers.get("location", "")
    assert dash_client.get("/dashboard").status_code == 200
    # Already logged in: the form sends you on.
    assert dash_client.get("/dashboard/login", follow_redirects=False).status_code == 303


def test_cookie_secure_and_samesite_are_configurable(dash_env):
    app_settings = dash_env.make_settings(dashboard_cookie_secure=False,
                                          dashboard_cookie_samesite="strict")
    from service.app import create_app

    with TestClient(create_app(app_settings), base_url="http://testserver") as c:
        r = login(c, dash_env.keys["read"])
        h = _cookie_header(r, "prospect_session").lower()
        assert "secure" not in h and "samesite=strict" in h
        assert c.get("/dashboard").status_code == 200  # works over plain HTTP


def test_login_refusals_name_the_field(dash_client, dash_env):
    r = login(dash_client, "prospect_" + "x" * 43)
    assert r.status_code == 401 and "key: unknown, revoked or expired" in r.text
    r = login(dash_client, dash_env.keys["ingest"])
    assert r.status_code == 403 and "lacks the &#39;read&#39; scope" in r.text
    r = login(dash_client, "")
    assert r.status_code == 422 and "key:" in r.text
    assert "prospect_session" not in dash_client.cookies


def test_login_needs_its_csrf_token(dash_client, dash_env):
    dash_client.get("/dashboard/login")
    r = dash_client.post("/dashboard/login", data={"key": dash_env.keys["read"]},
                         follow_redirects=False)
    assert r.status_code == 400 and "prospect_session" not in r.headers.get("set-cookie", "")
    token = csrf_of(dash_client.get("/dashboard/login").text)
    r = dash_client.post("/dashboard/login", data={"key": dash_env.keys["read"],
                                                   "csrf_token": token},
                         headers={"Sec-Fetch-Site": "cross-site"}, follow_redirects=False)
    assert r.status_code == 400
    dash_client.cookies.clear()  # a token without its cookie (another browser's) fails too
    r = dash_client.post("/dashboard/login", data={"key": dash_env.keys["read"],
                                                   "csrf_token": token},
                         follow_redirects=False)
    assert r.status_code == 400


def test_a_key_in_the_url_logs_nobody_in(dash_client, dash_env):
    r = dash_client.get(f"/dashboard/login?key={dash_env.keys['read']}", follow_redirects=False)
    assert r.status_code == 200 and "prospect_session" not in r.headers.get("set-cookie", "")
    assert dash_client.get("/dashboard", follow_redirects=False).status_code == 303


def test_open_redirects_are_refused(dash_client, dash_env):
    for bad in ("https://evil.example/", "//evil.example/x", "/\\evil", "/v1/feedback",
                "/dashboard/login"):
        dash_client.cookies.clear()
        r = login(dash_client, dash_env.keys["read"], bad)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard", bad


def test_tampered_expired_and_revoked_sessions_end(dash_client, dash_env):
    engine = dash_env.app.state.engine
    with make_sessionmaker(engine).begin() as s:
        key_id, secret = (lambda kv: (kv[0].id, kv[1]))(create_key(s, "read", name="tmp"))
    login(dash_client, secret)
    cookie = dash_client.cookies["prospect_session"]
    body, mac = cookie.split(".")
    _set_session(dash_client, body + "x." + mac)
    assert dash_client.get("/dashboard", follow_redirects=False).status_code == 303
    # Expired: signed by us, but past its time.
    signer = Signer(dash_env.settings)
    old = signer.issue("0" * 64, now=time.time() - 10 * 86400)
    assert signer.load(old) is None
    _set_session(dash_client, cookie)
    assert dash_client.get("/dashboard").status_code == 200
    with make_sessionmaker(engine).begin() as s:
        assert revoke_key(s, key_id)
    r = dash_client.get("/dashboard", follow_redirects=False)  # key cache TTL is 0 here
    assert r.status_code == 303
    assert dash_client.get("/dashboard/api/status").status_code == 401


def test_signing_key_derivation_and_override(dash_env):
    a = Signer(dash_env.settings)
    b = Signer(dash_env.make_settings(dashboard_session_key="another-secret-0123456789"))
    cookie = a.issue("ab" * 32)
    assert a.load(cookie) is not None and b.load(cookie) is None


def test_cancel_needs_admin_and_a_csrf_token(dash_client, dash_env):
    engine = dash_env.app.state.engine
    queued = seed_job(engine, status="queued", step=0, total_steps=None)
    # read key: no button, and a forged POST is refused
    login(dash_client, dash_env.keys["read"])
    page = dash_client.get(f"/dashboard/jobs/{queued}")
    assert page.status_code == 200 and 'id="cancel-form"' not in page.text
    token = csrf_of(page.text)  # the logout form's token
    r = dash_client.post(f"/dashboard/jobs/{queued}/cancel", data={"csrf_token": token})
    assert r.status_code == 403 and "admin key" in r.text
    # admin key: no token, a wrong token, a cross-site post: all refused
    dash_client.cookies.clear()
    login(dash_client, dash_env.keys["admin"])
    page = dash_client.get(f"/dashboard/jobs/{queued}")
    assert 'id="cancel-form"' in page.text
    token = csrf_of(page.text)
    for data, headers in (({}, {}), ({"csrf_token": "nope"}, {}),
                          ({"csrf_token": token}, {"Sec-Fetch-Site": "cross-site"})):
        r = dash_client.post(f"/dashboard/jobs/{queued}/cancel", data=data, headers=headers,
                             follow_redirects=False)
        assert r.status_code == 403 and "csrf_token" in r.text
    with engine.connect() as conn:
        assert conn.execute(select(training_jobs.c.status).where(
            training_jobs.c.id == queued)).scalar_one() == "queued"
    r = dash_client.post(f"/dashboard/jobs/{queued}/cancel", data={"csrf_token": token},
                         follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"/dashboard/jobs/{queued}?notice=cancelled"
    with engine.connect() as conn:
        assert conn.execute(select(training_jobs.c.status).where(
            training_jobs.c.id == queued)).scalar_one() == "cancelled"
    # A job that already finished: nothing to cancel, said so.
    done = seed_job(engine, status="succeeded", line="other")
    r = dash_client.post(f"/dashboard/jobs/{done}/cancel", data={"csrf_token": token},
                         follow_redirects=False)
    assert r.headers["location"].endswith("notice=already_finished")
    assert "already finished" in dash_client.get(r.headers["location"]).text
    r = dash_client.post("/dashboard/jobs/999999/cancel", data={"csrf_token": token})
    assert r.status_code == 404


def test_retry_needs_admin_and_a_csrf_token(dash_client, dash_env):
    from datetime import UTC, datetime

    engine = dash_env.app.state.engine
    failed = seed_job(engine, status="failed", error="CUDA error: out of memory",
                      finished_at=datetime.now(UTC))
    # read key: no button, and a forged POST is refused
    login(dash_client, dash_env.keys["read"])
    page = dash_client.get(f"/dashboard/jobs/{failed}")
    assert page.status_code == 200 and 'id="retry-form"' not in page.text
    token = csrf_of(page.text)
    r = dash_client.post(f"/dashboard/jobs/{failed}/retry", data={"csrf_token": token})
    assert r.status_code == 403 and "admin key" in r.text
    # admin key: the button next to the job; no token, a wrong one, a cross-site post: refused
    dash_client.cookies.clear()
    login(dash_client, dash_env.keys["admin"])
    page = dash_client.get(f"/dashboard/jobs/{failed}")
    assert 'id="retry-form"' in page.text and 'id="cancel-form"' not in page.text
    token = csrf_of(page.text)
    for data, headers in (({}, {}), ({"csrf_token": "nope"}, {}),
                          ({"csrf_token": token}, {"Sec-Fetch-Site": "cross-site"})):
        r = dash_client.post(f"/dashboard/jobs/{failed}/retry", data=data, headers=headers,
                             follow_redirects=False)
        assert r.status_code == 403 and "csrf_token" in r.text
    with engine.connect() as conn:
        assert conn.execute(select(training_jobs.c.status).where(
            training_jobs.c.id == failed)).scalar_one() == "failed"
    r = dash_client.post(f"/dashboard/jobs/{failed}/retry", data={"csrf_token": token},
                         follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"/dashboard/jobs/{failed}?notice=retried"
    page = dash_client.get(r.headers["location"])
    assert "Job queued again" in page.text and 'id="cancel-form"' in page.text
    assert 'id="retry-form"' not in page.text and "out of memory" in page.text  # history
    with engine.connect() as conn:
        row = conn.execute(select(training_jobs).where(training_jobs.c.id == failed)).one()
    assert row.status == "queued" and row.retries == 1 and row.max_attempts == 1 + 3
    assert row.retry_history[0]["retried_by"] == _admin_key_id(dash_env)
    # queued now: retrying it again is refused on the page, with the reason
    r = dash_client.post(f"/dashboard/jobs/{failed}/retry", data={"csrf_token": token})
    assert r.status_code == 409 and 'id="action-error"' in r.text and "is queued" in r.text
    # a line that already has an active job: refused, the job stays failed
    other = seed_job(engine, status="cancelled", line="other", finished_at=datetime.now(UTC))
    seed_job(engine, status="running", line="other")
    r = dash_client.post(f"/dashboard/jobs/{other}/retry", data={"csrf_token": token})
    assert r.status_code == 409 and "already has an active job" in r.text
    # a succeeded job has no button
    done = seed_job(engine, status="succeeded", line="third")
    assert 'id="retry-form"' not in dash_client.get(f"/dashboard/jobs/{done}").text
    r = dash_client.post("/dashboard/jobs/999999/retry", data={"csrf_token": token})
    assert r.status_code == 404


def _admin_key_id(env) -> int:
    from service.auth import KeyStore, digest

    return KeyStore(env.app.state.engine, 0).load(digest(env.keys["admin"])).id


def test_logout_needs_csrf_and_clears_the_session(dash_client, dash_env):
    login(dash_client, dash_env.keys["read"])
    r = dash_client.post("/dashboard/logout", data={}, follow_redirects=False)
    assert r.status_code == 403
    token = csrf_of(dash_client.get("/dashboard").text)
    r = dash_client.post("/dashboard/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    assert dash_client.get("/dashboard", follow_redirects=False).status_code == 303


def test_pages_send_security_headers(dash_client, dash_env):
    login(dash_client, dash_env.keys["read"])
    r = dash_client.get("/dashboard")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert "<script>" not in r.text  # no inline script: the CSP would block it anyway


def test_job_page_404_and_jobs_filter(dash_client, dash_env):
    engine = dash_env.app.state.engine
    a = seed_job(engine, status="failed", error="boom <script>alert(1)</script>",
                 finished_at=None)
    b = seed_job(engine, status="succeeded", line="other")
    login(dash_client, dash_env.keys["read"])
    assert dash_client.get("/dashboard/jobs/999999").status_code == 404
    page = dash_client.get(f"/dashboard/jobs/{a}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    failed = dash_client.get("/dashboard/jobs?status=failed").text
    assert f'data-job-id="{a}"' in failed and f'data-job-id="{b}"' not in failed
    assert dash_client.get("/dashboard/jobs?status=bogus").status_code == 422


def test_a_post_without_a_session_goes_to_login_then_home(dash_client, dash_env):
    r = dash_client.post("/dashboard/jobs/1/cancel", data={"csrf_token": "x"},
                         follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login?next=/dashboard"


def test_non_ascii_cookies_and_tokens_are_refused_not_500(dash_client, dash_env):
    """hmac.compare_digest raises on non-ASCII str: a cookie or a CSRF field with an é in it
    was a 500 on every dashboard page (found by fuzzing)."""
    assert Signer(dash_env.settings).load("a.\xe9") is None
    _set_session(dash_client, "a.\xe9")
    assert dash_client.get("/dashboard/api/status").status_code == 401
    assert dash_client.get("/dashboard", follow_redirects=False).status_code == 303
    dash_client.cookies.clear()
    dash_client.get("/dashboard/login")
    r = dash_client.post("/dashboard/login", data={"key": dash_env.keys["read"], "csrf_token": "\xe9"},
                         follow_redirects=False)
    assert r.status_code == 400
    login(dash_client, dash_env.keys["admin"])
    for path in ("/dashboard/logout", "/dashboard/jobs/5/cancel"):
        r = dash_client.post(path, data={"csrf_token": "\u0100"}, follow_redirects=False)
        assert r.status_code == 403, (path, r.status_code)
    assert dash_client.get("/dashboard").status_code == 200  # still logged in
