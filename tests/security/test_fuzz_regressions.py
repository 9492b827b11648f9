"""What the schemathesis runs found, pinned: each was a 500 before its fix."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.service.helpers import event

#: Valid ISO 8601 whose UTC time does not exist in Python (years 1..9999): astimezone()
#: overflowed in the validators and in the database bind.
NO_UTC = ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"]


@pytest.mark.parametrize("when", NO_UTC)
def test_datetimes_without_a_utc_time_are_422_naming_the_field(sec_env, when):
    ing, read, admin = (sec_env.headers(s) for s in ("ingest", "read", "admin"))
    with TestClient(sec_env.app, raise_server_exceptions=False) as c:
        r = c.post("/v1/feedback", json=event(occurred_at=when), headers=ing)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "occurred_at"
        r = c.post("/v1/feedback/batch", json=[event(occurred_at=when)], headers=ing)
        assert r.status_code == 207 and r.json()["rejected"] == 1
        assert r.json()["results"][0]["errors"][0]["field"] == "occurred_at"
        r = c.post("/v1/feedback/import-pairs", headers=ing, json=[
            {"prompt": "p", "chosen": "a", "rejected": "b", "occurred_at": when}])
        assert r.status_code == 207 and r.json()["pairs_rejected"] == 1
        r = c.post("/v1/jobs", json={"filters": {"since": when}}, headers=admin)
        assert r.status_code == 422
        assert r.json()["errors"][0]["field"] == "body.filters.since"
        for path in ("/v1/feedback", "/v1/feedback/export", "/v1/balance", "/v1/balance/daily"):
            for name in ("since", "until"):
                r = c.get(path, params={name: when}, headers=read)
                assert r.status_code == 422, (path, name, r.status_code)
                assert r.json()["errors"][0]["field"] == name


def test_undecodable_bodies_are_400_naming_the_body(sec_env):
    """Bytes FastAPI cannot even decode: its own 400, now documented and naming the body
    (plain bad JSON is FastAPI's 422, also naming the body)."""
    with TestClient(sec_env.app, raise_server_exceptions=False) as c:
        for path in ("/v1/erasures", "/v1/jobs", "/v1/rollback", "/v1/storage/cleanup"):
            r = c.post(path, content=b"?G\xffnk\x01", headers={**sec_env.headers("admin"),
                                                       "Content-Type": "application/json"})
            assert r.status_code == 400, (path, r.status_code)
            assert r.json()["errors"] == [{"field": "body", "message": r.json()["errors"][0][
                "message"]}]


def test_rollout_events_answer_a_page(sec_env):
    with TestClient(sec_env.app, raise_server_exceptions=False) as c:
        r = c.get("/v1/rollout-events", headers=sec_env.headers("read"))
        assert r.status_code == 200 and r.json() == {"events": [], "next_cursor": None}
        spec = c.get("/openapi.json").json()
    ref = spec["paths"]["/v1/rollout-events"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]["$ref"]
    assert ref.endswith("/RolloutEventPage")


# ----------------------------------------------------------------------------- a helper's fuzz run
# (in-process app on Postgres and SQLite, hypothesis + schemathesis + hand-made inputs). Each
# case below was a 500, or a 422 that named no field, before its fix.

NUL = "a\x00b"


def _fields(r) -> list[str]:
    return [e["field"] for e in r.json()["errors"]]


def test_unbounded_job_integers_are_refused_before_anything_is_stored(rights_env):
    """save_every_steps=2**70 was stored and queued, then every job listing answered 500 (the
    response encoder refuses integers beyond 64 bits)."""
    admin = rights_env.headers("admin")
    with TestClient(rights_env.app, raise_server_exceptions=False) as c:
        r = c.post("/v1/jobs", json={"params": {"save_every_steps": 2**70}}, headers=admin)
        assert r.status_code == 422 and _fields(r) == ["body.params.save_every_steps"]
        r = c.get("/v1/jobs", headers=admin)
        assert r.status_code == 200 and r.json()["jobs"] == []


def test_nul_characters_outside_ingestion_are_422_naming_the_field(rights_env):
    """Postgres refuses NUL in text: these reached the database and came back as a 422 without
    a field (SQLite stored them)."""
    read, admin = rights_env.headers("read"), rights_env.headers("admin")
    with TestClient(rights_env.app, raise_server_exceptions=False) as c:
        for path in ("/v1/feedback", "/v1/feedback/export", "/v1/balance", "/v1/balance/daily"):
            for name in ("model_version", "source"):
                r = c.get(path, params={name: NUL}, headers=read)
                assert r.status_code == 422 and _fields(r) == [f"query.{name}"], (path, name, r.text)
        for path in ("/v1/jobs", "/v1/references"):
            r = c.get(path, params={"line": NUL}, headers=read)
            assert r.status_code == 422 and _fields(r) == ["query.line"], (path, r.text)
        cases = [
            ("put", "/v1/lines/x", {"base_model": NUL}, "body.base_model"),
            ("post", "/v1/jobs", {"filters": {"source": NUL}}, "body.filters.source"),
            ("post", "/v1/jobs", {"filters": {"model_version": NUL}}, "body.filters.model_version"),
            ("post", "/v1/erasures", {"user_id": "u", "reason": NUL}, "body.reason"),
            ("post", "/v1/rollback", {"reason": NUL}, "body.reason"),
            ("post", "/v1/checkpoints/1/promote", {"stage": "canary", "percent": 10, "reason": NUL}, "body.reason"),
        ]
        for method, path, body, field in cases:
            r = getattr(c, method)(path, json=body, headers=admin)
            assert r.status_code == 422 and _fields(r) == [field], (path, r.text)
        assert c.get("/v1/erasures", headers=admin).json()["erasures"] == []  # nothing was written


@pytest.mark.parametrize("occurred_at,row_id", [("0001-01-01T00:00:00+05:00", 1), ("2020-01-01T00:00:00", 2**64),
                                                 ("2020-01-01T00:00:00", 0)])
def test_crafted_feedback_cursors_are_422_naming_the_cursor(rights_env, occurred_at, row_id):
    import base64
    import json

    cursor = base64.urlsafe_b64encode(json.dumps([occurred_at, row_id]).encode()).decode()
    with TestClient(rights_env.app, raise_server_exceptions=False) as c:
        r = c.get("/v1/feedback", params={"cursor": cursor}, headers=rights_env.headers("read"))
        assert r.status_code == 422 and _fields(r) == ["cursor"], r.text


def test_missing_jobs_and_snapshots_name_their_id(rights_env):
    admin = rights_env.headers("admin")
    with TestClient(rights_env.app, raise_server_exceptions=False) as c:
        for method, path, field in (("get", "/v1/jobs/7", "job_id"), ("post", "/v1/jobs/7/cancel", "job_id"),
                                    ("post", "/v1/jobs/7/retry", "job_id"),
                                    ("get", "/v1/references/7", "snapshot_id"),
                                    ("delete", "/v1/references/7", "snapshot_id")):
            r = getattr(c, method)(path, headers=admin)
            assert r.status_code == 404 and _fields(r) == [field], (path, r.text)


def test_a_chunked_body_over_the_limit_is_413_on_model_routes(tmp_path, sec_template):
    """Without a Content-Length the limit trips while FastAPI reads the body for a pydantic
    model, which it reported as a 400 'error parsing the body'."""
    from tests.security.conftest import sqlite_env

    env = sqlite_env(tmp_path, sec_template, max_body_bytes=1024)

    def chunks():
        yield b'{"user_id": "'
        for _ in range(30):
            yield b"x" * 100
        yield b'"}'

    try:
        with TestClient(env.app, raise_server_exceptions=False) as c:
            for path in ("/v1/erasures", "/v1/jobs", "/v1/rollback"):
                r = c.post(path, content=chunks(), headers={**env.headers("admin"), "content-type": "application/json"})
                assert r.status_code == 413 and _fields(r) == ["body"], (path, r.status_code, r.text)
    finally:
        env.app.state.engine.dispose()
