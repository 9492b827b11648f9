"""The checkpoints page on the registry: lineage, live comparison, promote and roll back
through the dashboard's forms (admin key + CSRF), recorded in the audit trail."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from tests.dashboard.conftest import csrf_of, login, seed_checkpoint
from tests.service.helpers import event


def _stage(engine: Any, cid: int) -> tuple[str, float | None]:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT stage, canary_percent FROM checkpoints WHERE id = :i"),
                           {"i": cid}).one()
    return row[0], row[1]


def test_page_shows_lineage_evaluation_and_live_comparison(dash_client, dash_env):
    engine = dash_env.app.state.engine
    prod, prod_v = seed_checkpoint(engine, stage="production")
    can, can_v = seed_checkpoint(engine, stage="canary", percent=10.0)
    h = dash_env.headers("ingest")
    events = ([event(model_version=prod_v, label="up") for _ in range(6)]
              + [event(model_version=prod_v, label="down") for _ in range(4)]
              + [event(model_version=can_v, label="up") for _ in range(3)]
              + [event(model_version=can_v, label="down")])
    assert dash_client.post("/v1/feedback/batch", json={"events": events},
                            headers=h).status_code == 207
    login(dash_client, dash_env.keys["read"])
    page = dash_client.get("/dashboard/checkpoints")
    assert page.status_code == 200
    html = page.text
    assert 'id="live-comparison"' in html and 'data-arm="canary"' in html
    assert "6 / 10" in html and "3 / 4" in html  # live thumbs-up per arm
    assert 'href="/dashboard/jobs/' in html and "margin" in html and "checks.length_drift" in html
    # A read key sees no forms.
    assert "/promote" not in html and "/rollback" not in html
    body = dash_client.get("/dashboard/api/checkpoints").json()
    [report] = body["live_comparison"]
    assert report["production"]["model_version"] == prod_v
    assert (report["canary"]["up"], report["canary"]["n"]) == (3, 4)
    assert report["guard"]["decision"] in ("continue", "rollback", "promote", "inconclusive")
    assert {c["id"] for c in body["checkpoints"]} == {prod, can}
    # The overview's card names both.
    over = dash_client.get("/dashboard").text
    assert prod_v in over and can_v in over


def test_admin_starts_a_canary_promotes_and_rolls_back(dash_client, dash_env):
    engine = dash_env.app.state.engine
    cand, cand_v = seed_checkpoint(engine, stage="candidate")
    login(dash_client, dash_env.keys["admin"])
    page = dash_client.get("/dashboard/checkpoints").text
    token = csrf_of(page)
    assert f'action="/dashboard/checkpoints/{cand}/promote"' in page

    # Without a token: refused, nothing changes.
    r = dash_client.post(f"/dashboard/checkpoints/{cand}/promote",
                         data={"stage": "canary", "percent": "5"})
    assert r.status_code == 403 and _stage(engine, cand) == ("candidate", None)
    # A bad percentage: 422 naming the field, nothing changes.
    r = dash_client.post(f"/dashboard/checkpoints/{cand}/promote",
                         data={"csrf_token": token, "stage": "canary", "percent": "250"})
    assert r.status_code == 422 and "percent:" in r.text
    # Start a 5 % canary.
    r = dash_client.post(f"/dashboard/checkpoints/{cand}/promote", follow_redirects=False,
                         data={"csrf_token": token, "stage": "canary", "percent": "5"})
    assert r.status_code == 303 and r.headers["location"].endswith("notice=canary_set")
    assert _stage(engine, cand) == ("canary", 5.0)
    # Promote it to production.
    r = dash_client.post(f"/dashboard/checkpoints/{cand}/promote", follow_redirects=False,
                         data={"csrf_token": token, "stage": "production", "reason": "good"})
    assert r.status_code == 303 and _stage(engine, cand)[0] == "production"
    # Promoting it again: the registry's refusal, shown with its status.
    r = dash_client.post(f"/dashboard/checkpoints/{cand}/promote",
                         data={"csrf_token": token, "stage": "production"})
    assert r.status_code == 409 and "already production" in r.text
    # Roll back: it is rejected and the base model serves again.
    r = dash_client.post(f"/dashboard/checkpoints/{cand}/rollback", follow_redirects=False,
                         data={"csrf_token": token, "reason": "thumbs fell"})
    assert r.status_code == 303 and r.headers["location"].endswith("notice=rolled_back")
    assert _stage(engine, cand)[0] == "rejected"
    # Every change is in the audit trail, by this key.
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT action, actor, reason FROM rollout_events WHERE checkpoint_id = :i "
            "ORDER BY id"), {"i": cand}).all()
    assert [r[0] for r in rows] == ["canary", "production", "rollback"]
    assert all(r[1].startswith("key:") for r in rows) and rows[-1][2] == "thumbs fell"
    log = dash_client.get("/dashboard/checkpoints").text
    assert "thumbs fell" in log and cand_v in log
    # Rolling back a rejected checkpoint is refused.
    r = dash_client.post(f"/dashboard/checkpoints/{cand}/rollback",
                         data={"csrf_token": token, "reason": "again"})
    assert r.status_code == 409 and "only production or a canary" in r.text


def test_rollout_changes_need_admin(dash_client, dash_env):
    engine = dash_env.app.state.engine
    cand, _ = seed_checkpoint(engine, stage="candidate")
    login(dash_client, dash_env.keys["read"])
    token = csrf_of(dash_client.get("/dashboard/checkpoints").text)
    r = dash_client.post(f"/dashboard/checkpoints/{cand}/promote",
                         data={"csrf_token": token, "stage": "canary", "percent": "5"})
    assert r.status_code == 403 and "admin key" in r.text
    assert _stage(engine, cand) == ("candidate", None)
    r = dash_client.post(f"/dashboard/checkpoints/{cand}/explode", data={"csrf_token": token})
    assert r.status_code == 422


def test_admin_rejects_a_pending_checkpoint_from_the_page(dash_client, dash_env):
    """pending and candidate rows get a Reject form (CSRF, reason); live rows do not."""
    engine = dash_env.app.state.engine
    pending, _ = seed_checkpoint(engine, stage="pending")
    prod, _ = seed_checkpoint(engine, stage="production")
    login(dash_client, dash_env.keys["admin"])
    page = dash_client.get("/dashboard/checkpoints").text
    token = csrf_of(page)
    assert f'action="/dashboard/checkpoints/{pending}/reject"' in page
    assert f'action="/dashboard/checkpoints/{prod}/reject"' not in page
    r = dash_client.post(f"/dashboard/checkpoints/{pending}/reject", data={"reason": "x"})
    assert r.status_code == 403 and _stage(engine, pending)[0] == "pending"
    r = dash_client.post(f"/dashboard/checkpoints/{pending}/reject",
                         data={"csrf_token": token, "reason": "bad\x00reason"})
    assert r.status_code == 422 and "reason:" in r.text
    r = dash_client.post(f"/dashboard/checkpoints/{pending}/reject", follow_redirects=False,
                         data={"csrf_token": token, "reason": "wrong data window"})
    assert r.status_code == 303 and r.headers["location"].endswith("notice=rejected")
    assert _stage(engine, pending)[0] == "rejected"
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT action, from_stage, actor, reason FROM rollout_events "
            "WHERE checkpoint_id = :i ORDER BY id DESC"), {"i": pending}).first()
    assert row[0] == "rejected" and row[1] == "pending" and row[2].startswith("key:")
    assert row[3] == "wrong data window"
    # production is rolled back, not rejected
    r = dash_client.post(f"/dashboard/checkpoints/{prod}/reject",
                         data={"csrf_token": token, "reason": "no"})
    assert r.status_code == 409 and "roll it back" in r.text
    assert _stage(engine, prod)[0] == "production"
