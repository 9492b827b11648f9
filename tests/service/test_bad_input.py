"""Bad input: every case is a 4xx naming the field, never a 5xx; on both backends."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service.helpers import event

TEXT_FIELDS = ["event_id", "completion", "model_version", "user_id", "session_id", "source",
               "environment", "trace_id", "request_id", "replaces", "correction", "comment"]


def _post(env, client, body, path="/v1/feedback"):
    # stdlib json: it can also write integers beyond 64 bits, which clients may send.
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=raw, headers={**env.headers("ingest"),
                                                   "content-type": "application/json"})


def _fields(r) -> list[str]:
    return [e["field"] for e in r.json()["errors"]]


@pytest.mark.parametrize("field", TEXT_FIELDS + ["prompt"])
def test_nul_byte_in_any_text_field_is_422_naming_it(env, client, field):
    value = "bad\u0000value"
    if field == "replaces":
        value = "other\u0000id"
    r = _post(env, client, event(**{field: value}))
    assert r.status_code == 422, r.text
    assert _fields(r) == [field]
    assert "NUL" in r.json()["message"]


@pytest.mark.parametrize("where", ["key", "value", "nested", "message"])
def test_nul_byte_in_metadata_and_messages(env, client, where):
    ev = {
        "key": event(metadata={"a\u0000b": 1}),
        "value": event(metadata={"a": "x\u0000"}),
        "nested": event(metadata={"a": [{"b": "\u0000"}]}),
        "message": event(prompt=[{"role": "user", "content": "hi\u0000"}]),
    }[where]
    r = _post(env, client, ev)
    assert r.status_code == 422
    assert _fields(r) == ["prompt[0].content" if where == "message" else "metadata"]


@pytest.mark.parametrize("field,limit_attr", [
    ("completion", "max_text_chars"), ("comment", "max_text_chars"),
    ("event_id", "max_id_chars"), ("model_version", "max_id_chars"), ("prompt", "max_text_chars"),
])
def test_over_long_fields(env, client, field, limit_attr):
    n = getattr(env.settings, limit_attr) + 1
    r = _post(env, client, event(**{field: "x" * n}))
    assert r.status_code == 422 and _fields(r) == [field]


@pytest.mark.parametrize("field,value", [
    ("completion", 42), ("label", 1), ("label", "yes"), ("label", None), ("model_version", ["a"]),
    ("prompt", 3), ("prompt", [{"role": "user"}]), ("prompt", [{"role": "user", "content": 1}]),
    ("prompt", []), ("prompt", "  "), ("metadata", [1, 2]), ("metadata", "str"),
    ("occurred_at", "yesterday"), ("occurred_at", 1e30), ("event_id", ""), ("completion", ""),
    ("completion", " \n\t"),
])
def test_wrong_types_unknown_labels_empty_values(env, client, field, value):
    r = _post(env, client, event(**{field: value}))
    assert r.status_code == 422, r.text
    # Message errors name the exact place, e.g. prompt[0].content.
    assert [f.split("[")[0] for f in _fields(r)] == [field]


def test_missing_required_and_unknown_fields(env, client):
    ev = event()
    del ev["completion"]
    ev["lable"] = "up"
    r = _post(env, client, ev)
    assert r.status_code == 422 and sorted(_fields(r)) == ["completion", "lable"]


def test_replaces_itself(env, client):
    ev = event()
    r = _post(env, client, {**ev, "replaces": ev["event_id"]})
    assert r.status_code == 422 and _fields(r) == ["replaces"]


def test_deep_and_huge_metadata(env, client):
    deep: dict = {}
    node = deep
    for _ in range(env.settings.max_metadata_depth + 2):
        node["n"] = {}
        node = node["n"]
    r = _post(env, client, event(metadata=deep))
    assert r.status_code == 422 and _fields(r) == ["metadata"] and "deeper" in r.text
    r = _post(env, client, event(metadata={"blob": "x" * (env.settings.max_metadata_bytes + 1)}))
    assert r.status_code == 422 and _fields(r) == ["metadata"] and "bytes" in r.text
    many = {f"k{i}": i for i in range(env.settings.max_metadata_keys + 1)}
    r = _post(env, client, event(metadata=many))
    assert r.status_code == 422 and _fields(r) == ["metadata"]
    # A pathologically nested body is refused by the JSON parser, not by a crash.
    r = _post(env, client, b'{"metadata":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert r.status_code == 400 and _fields(r) == ["body"]


def test_timestamps_far_in_future_or_past(env, client):
    future = datetime.now(UTC) + timedelta(days=2)
    r = _post(env, client, event(occurred_at=future.isoformat()))
    assert r.status_code == 422 and _fields(r) == ["occurred_at"] and "future" in r.text
    r = _post(env, client, event(occurred_at="1970-01-01T00:00:00Z"))
    assert r.status_code == 422 and _fields(r) == ["occurred_at"]
    slight = datetime.now(UTC) + timedelta(seconds=30)  # clock skew is tolerated
    assert _post(env, client, event(occurred_at=slight.isoformat())).status_code == 201


@pytest.mark.parametrize("raw", [
    b'{"event_id": "x", "completion": "\xff\xfe"}',         # invalid UTF-8
    b'{"event_id": "x", "completion": "\\ud800"}',           # lone surrogate
    b'{"event_id": ',                                        # truncated
    b"",
])
def test_invalid_utf8_and_malformed_json(env, client, raw):
    r = _post(env, client, raw)
    assert r.status_code == 400 and _fields(r) == ["body"]


def test_body_must_be_an_object(env, client):
    r = _post(env, client, [event()])
    assert r.status_code == 422 and _fields(r) == ["body"]


def test_oversized_body_is_413_before_reading(env, client):
    from fastapi.testclient import TestClient

    from service.app import create_app

    small = create_app(env.make_settings(max_body_bytes=2048))
    with TestClient(small, raise_server_exceptions=False) as c:
        big = orjson.dumps(event(completion="x" * 5000))
        r = c.post("/v1/feedback", content=big,
                   headers={**env.headers("ingest"), "content-type": "application/json"})
        assert r.status_code == 413 and _fields(r) == ["body"]

        def chunks():  # no Content-Length: counted while streaming
            for _ in range(10):
                yield b"x" * 1000

        r = c.post("/v1/feedback/batch", content=chunks(), headers=env.headers("ingest"))
        assert r.status_code == 413 and _fields(r) == ["body"]
        ok = c.post("/v1/feedback", json=event(), headers=env.headers("ingest"))
        assert ok.status_code == 201


def test_batch_over_limit_and_bad_shapes(env, client):
    n = env.settings.max_batch_items + 1
    r = _post(env, client, {"events": [event() for _ in range(n)]}, "/v1/feedback/batch")
    assert r.status_code == 422 and _fields(r) == ["events"] and str(n) in r.json()["message"]
    for body in ({"events": []}, {"events": "x"}, {"evts": []}, {"events": [], "x": 1}, 7):
        r = _post(env, client, body, "/v1/feedback/batch")
        assert r.status_code == 422 and _fields(r) == ["events"], body


def test_batch_item_errors_name_the_field(env, client):
    items = [event(label="sideways"), event(metadata={"k": "\u0000"}), event()]
    r = _post(env, client, {"events": items}, "/v1/feedback/batch")
    res = r.json()["results"]
    assert [x["status"] for x in res] == ["rejected", "rejected", "accepted"]
    assert res[0]["errors"][0]["field"] == "label" and res[0]["reason"].startswith("label:")
    assert res[1]["errors"][0]["field"] == "metadata"


def test_query_parameter_errors_are_422_naming_them(env, client):
    h = env.headers("read")
    r = client.get("/v1/feedback", params={"since": "not-a-date"}, headers=h)
    assert r.status_code == 422 and _fields(r) == ["query.since"]
    r = client.get("/v1/feedback", params={"limit": 0}, headers=h)
    assert r.status_code == 422 and _fields(r) == ["query.limit"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(TEXT_FIELDS + ["prompt", "label", "metadata", "occurred_at"])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.dictionaries(field_names, json_values, max_size=4),
       as_batch=st.booleans())
def test_no_input_causes_a_5xx(env, client, overrides, as_batch):
    body = event(**overrides)
    if as_batch:
        r = _post(env, client, {"events": [body, body]}, "/v1/feedback/batch")
    else:
        r = _post(env, client, body)
    assert r.status_code < 500, r.text


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300) | st.text(max_size=200).map(str.encode),
       path=st.sampled_from(["/v1/feedback", "/v1/feedback/batch",
                             "/v1/feedback/import-pairs"]))
def test_no_raw_body_causes_a_5xx(env, client, raw, path):
    r = client.post(path, content=raw, headers={**env.headers("ingest"),
                                                "content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text


def test_missing_prompt_is_one_error_not_two(env, client):
    """A missing prompt is "Field required" once, not also "must be a string or a list"."""
    ev = event()
    del ev["prompt"]
    r = _post(env, client, ev)
    assert r.status_code == 422 and _fields(r) == ["prompt"], r.text
    assert r.json()["message"] == "prompt: Field required"
    r = _post(env, client, {"events": [ev]}, "/v1/feedback/batch")
    assert r.json()["results"][0]["errors"] == [{"field": "prompt", "message": "Field required"}]
    r = _post(env, client, event(prompt=5))  # there but neither branch: the one shape message
    assert r.status_code == 422 and _fields(r) == ["prompt"] and "a string or a list" in r.text


@pytest.mark.parametrize("path,body", [
    ("/v1/erasures", {"user_id": "u1"}),
    ("/v1/storage/cleanup", {"dry_run": True}),
    ("/v1/rollback", {"line": "default"}),
])
def test_json_body_sent_as_a_form_is_415_naming_the_content_type(env, client, path, body):
    """`curl -d '{...}'` without a content-type header sends a form type: the answer says which
    header to send, not pydantic's "Input should be a valid dictionary"."""
    raw = json.dumps(body).encode()
    r = client.post(path, content=raw, headers={
        **env.headers("admin"), "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported_media_type" and _fields(r) == ["content-type"]
    assert "application/json" in r.json()["message"]
    r = client.post(path, content=b"[1]", headers={**env.headers("admin"),
                                                    "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid"  # JSON of the wrong shape
