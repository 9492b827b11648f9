"""What reaches the disk and the logs: key digests only, keyed user hashes only, no prompts
or secrets in logs, and the optional e-mail/phone redaction (before the payload hash)."""

from __future__ import annotations

import io
import logging
import time
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import given, settings, strategies as st
from sqlalchemy import inspect, select, text

from service.ingest import hash_user_id
from service.logging_setup import JsonFormatter
from service.models import api_keys, feedback_events
from service.redaction import EMAIL_MASK, PHONE_MASK, redact_text
from tests.dashboard.conftest import login
from tests.security.conftest import sqlite_env
from tests.service.helpers import event

RAW_USER = "raw-user-7f3a-Zq9@example.org"
PROMPT_MARK = "PROMPT-MARK-91d2c"
COMPLETION_MARK = "COMPLETION-MARK-5be0"


def dump_database(engine: Any) -> str:
    """Every value of every row of every table, as text."""
    out = []
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                out.append(" ".join(str(v) for v in row))
    return "\n".join(out)


def test_api_keys_table_never_holds_a_secret(sec_env):
    dump = dump_database(sec_env.app.state.engine)
    with sec_env.app.state.engine.connect() as conn:
        rows = conn.execute(select(api_keys)).mappings().all()
    assert len(rows) >= 3
    for scope, secret in sec_env.keys.items():
        assert secret not in dump, scope
        # not even the part after the displayed prefix
        assert secret[len("prospect_") + 6:] not in dump, scope
    for r in rows:
        assert len(r["digest"]) == 64 and all(c in "0123456789abcdef" for c in r["digest"])


def test_raw_user_ids_never_reach_the_database(tmp_path, sec_template):
    env = sqlite_env(tmp_path, sec_template)
    with TestClient(env.app, raise_server_exceptions=False) as c:
        assert c.post("/v1/feedback", json=event(user_id=RAW_USER),
                      headers=env.headers("ingest")).status_code == 201
        r = c.post("/v1/feedback/batch", json=[event(user_id=RAW_USER), event(user_id=RAW_USER)],
                   headers=env.headers("ingest"))
        assert r.json()["accepted"] == 2
        assert c.get("/v1/serve", headers={**env.headers("ingest"),
                                           "X-User-Id": RAW_USER}).status_code in (200, 409)
        listed = c.get("/v1/feedback", headers=env.headers("read")).json()["items"]
    expected = hash_user_id(RAW_USER, env.settings.user_id_key)
    assert {i["user_hash"] for i in listed} == {expected}
    assert RAW_USER not in dump_database(env.app.state.engine)
    env.app.state.engine.dispose()
    # Not in the file either (WAL included): the raw id was never written anywhere.
    for f in tmp_path.glob("prospect.db*"):
        assert RAW_USER.encode() not in f.read_bytes(), f.name
    # Keyed: without the key the hash cannot be recomputed from a guessed id.
    assert hash_user_id(RAW_USER, "another-key-0123456789") != expected


def test_no_keys_user_ids_or_texts_in_the_logs(tmp_path, sec_template):
    """Drive ingestion (good and bad), the serving call, a dashboard login, a job creation
    and an erasure with DEBUG logging, and read every rendered log line."""
    env = sqlite_env(tmp_path, sec_template, base_model="toy-base", key_cache_ttl_s=0,
                     min_per_class=1, holdout_fraction=0.0)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    secrets_ = list(env.keys.values())
    try:
        with TestClient(env.app, base_url="https://testserver",
                        raise_server_exceptions=False) as c:
            ing, admin = env.headers("ingest"), env.headers("admin")
            for label in ("up", "down"):
                for user in (RAW_USER, RAW_USER + "-2"):
                    r = c.post("/v1/feedback", headers=ing, json=event(
                        user_id=user, label=label, prompt=f"{PROMPT_MARK} {label}",
                        completion=f"{COMPLETION_MARK} {user}"))
                    assert r.status_code == 201, r.text
            # rejected items echo nothing of theirs into the logs
            r = c.post("/v1/feedback", headers=ing, json=event(
                user_id=RAW_USER, label="sideways", prompt=PROMPT_MARK))
            assert r.status_code == 422
            c.post("/v1/feedback", headers=ing, content=b'{"user_id": "' + RAW_USER.encode())
            c.post("/v1/feedback", headers={"Authorization": f"Bearer {secrets_[0]}x"},
                   json=event())
            c.get("/v1/serve", headers={**ing, "X-User-Id": RAW_USER})
            c.post("/v1/serve", headers=ing, json={"user_id": RAW_USER})
            assert login(c, env.keys["read"]).status_code == 303
            login(c, env.keys["ingest"])  # refused: lacks read
            r = c.post("/v1/jobs", headers=admin, json={})
            assert r.status_code in (202, 409), r.text
            r = c.post("/v1/erasures", headers=admin, json={"user_id": RAW_USER})
            assert r.status_code == 201 and r.json()["n_events"] == 2
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        env.app.state.engine.dispose()
    logged = buf.getvalue()
    assert "POST /v1/feedback 201" in logged and "/v1/erasures" in logged  # not vacuous
    assert "dashboard login" in logged
    for secret in secrets_:
        assert secret not in logged
        assert secret[len("prospect_"):] not in logged
    for needle in (RAW_USER, PROMPT_MARK, COMPLETION_MARK):
        assert needle not in logged, needle
    assert hash_user_id(RAW_USER, env.settings.user_id_key) not in logged


# ---- redaction ---------------------------------------------------------------------------------

PII_PROMPT = "I am jane.doe@example.com, call me on +1 415 555 2671 or (020) 7946-0958."


def _stored(env: Any) -> list[dict[str, Any]]:
    with env.app.state.engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(feedback_events).order_by(feedback_events.c.id)).mappings()]


def test_redaction_is_off_by_default(sec_env):
    assert sec_env.settings.redact_pii is False
    with TestClient(sec_env.app) as c:
        assert c.post("/v1/feedback", json=event(prompt=PII_PROMPT),
                      headers=sec_env.headers("ingest")).status_code == 201
    assert _stored(sec_env)[0]["prompt"] == PII_PROMPT


def test_redaction_before_storage_and_before_the_hash(tmp_path, sec_template):
    env = sqlite_env(tmp_path, sec_template, redact_pii=True)
    h = env.headers("ingest")
    single = event(prompt=PII_PROMPT, completion="Mail support@example.com.",
                   correction="Ring 555-123-4567", comment="from bob@example.net",
                   metadata={"contact": "keep@example.com"})
    chat = event(prompt=[{"role": "user", "content": "me: x@example.io"},
                         {"role": "assistant", "content": "ok"}])
    with TestClient(env.app) as c:
        assert c.post("/v1/feedback", json=single, headers=h).status_code == 201
        # A retry of the same raw event is a duplicate (the hash covers the redacted text).
        r = c.post("/v1/feedback", json=single, headers=h)
        assert r.status_code == 200 and r.json()["status"] == "duplicate"
        r = c.post("/v1/feedback/batch", json=[chat, single], headers=h).json()
        assert [x["status"] for x in r["results"]] == ["accepted", "duplicate"]
        r = c.post("/v1/feedback/import-pairs", headers=h, json=[{
            "prompt": "who is a@example.com?", "chosen": "+44 20 7946 0958", "rejected": "no"}])
        assert r.json()["events_accepted"] == 2
        r = c.post("/v1/feedback/import-pairs", headers=h, json=[{
            "prompt": "who is a@example.com?", "chosen": "+44 20 7946 0958", "rejected": "no"}])
        assert r.json()["events_duplicate"] == 2
    rows = _stored(env)
    assert rows[0]["prompt"] == f"I am {EMAIL_MASK}, call me on {PHONE_MASK} or {PHONE_MASK}."
    assert rows[0]["completion"] == f"Mail {EMAIL_MASK}."
    assert rows[0]["correction"] == f"Ring {PHONE_MASK}"
    assert rows[0]["comment"] == f"from {EMAIL_MASK}"
    assert rows[0]["metadata"] == {"contact": "keep@example.com"}  # the client's fields
    assert rows[1]["prompt"][0]["content"] == f"me: {EMAIL_MASK}"
    assert rows[2]["prompt"] == f"who is {EMAIL_MASK}?" and rows[2]["completion"] == PHONE_MASK
    dump = dump_database(env.app.state.engine)
    for raw in ("jane.doe@example.com", "415 555 2671", "support@example.com",
                "bob@example.net", "x@example.io", "7946 0958"):
        assert raw not in dump, raw


def test_redaction_leaves_ordinary_text_alone():
    for s in ("It is 42.", "Released 2024-01-15 as v1.2.3", "see 192.168.1.1", "3.14159",
              "a@b", "10 000 000 people", "order 12345678", "x = 12 + 34"):
        assert redact_text(s) == s, s
    for s, want in (("write to a.b-c+d@mail.example.co.uk now", f"write to {EMAIL_MASK} now"),
                    ("+14155552671", PHONE_MASK), ("tel 0151 234 5678", f"tel {PHONE_MASK}"),
                    ("(555) 123-4567", PHONE_MASK), ("+49 (0) 30 1234567", PHONE_MASK)):
        assert redact_text(s) == want, s


def test_redaction_is_linear_on_hostile_text():
    hostile = ["a" * 100_000, "a" * 60 + "@" + "b." * 45_000, "1-" * 50_000,
               ("x" * 63 + "@") * 1500, "(1) " * 25_000, "+" + "9" * 100_000]
    for s in hostile:
        t = time.perf_counter()
        redact_text(s)
        assert time.perf_counter() - t < 1.0, s[:20]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab.@+-() 0123456789x"), max_size=80))
def test_redaction_is_idempotent(s):
    once = redact_text(s)
    assert redact_text(once) == once
