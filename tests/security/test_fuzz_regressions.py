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
