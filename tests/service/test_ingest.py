"""Core ingestion, on SQLite and on Postgres: idempotency, batches, replaces, reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy import func, select, text

from service.ingest import hash_user_id
from service.models import feedback_events
from tests.service.helpers import event


def _count(env, event_id: str | None = None) -> int:
    stmt = select(func.count()).select_from(feedback_events)
    if event_id is not None:
        stmt = stmt.where(feedback_events.c.event_id == event_id)
    with env.app.state.engine.connect() as conn:
        return conn.execute(stmt).scalar_one()


def test_single_accept_duplicate_conflict(env, client):
    ev = event()
    r = client.post("/v1/feedback", json=ev, headers=env.headers("ingest"))
    assert r.status_code == 201, r.text
    assert r.json() == {"event_id": ev["event_id"], "status": "accepted"}
    r = client.post("/v1/feedback", json=ev, headers=env.headers("ingest"))
    assert r.status_code == 200 and r.json()["status"] == "duplicate"
    # "up" and true are the same payload: still a duplicate.
    r = client.post("/v1/feedback", json={**ev, "label": True}, headers=env.headers("ingest"))
    assert r.status_code == 200 and r.json()["status"] == "duplicate"
    r = client.post("/v1/feedback", json={**ev, "label": "down"}, headers=env.headers("ingest"))
    assert r.status_code == 409
    assert r.json()["errors"][0]["field"] == "event_id"
    assert _count(env, ev["event_id"]) == 1
    with env.app.state.engine.connect() as conn:
        stored = conn.execute(select(feedback_events.c.desirable)).scalar_one()
    assert stored is True  # never overwritten by the conflicting payload


def test_batch_mixed_results_keep_good_items(env, client):
    stored = event()
    client.post("/v1/feedback", json=stored, headers=env.headers("ingest"))
    good1, good2 = event(), event(label=False)
    items = [
        good1,
        stored,                                    # duplicate of a stored event
        {**good1, "completion": "changed"},        # in-batch conflict with good1
        event(completion=""),                      # rejected
        "not an object",                           # rejected
        good2,
        {**stored, "label": "down"},               # conflict with the stored event
        good2,                                     # in-batch duplicate
    ]
    r = client.post("/v1/feedback/batch", json={"events": items}, headers=env.headers("ingest"))
    assert r.status_code == 207, r.text
    body = r.json()
    assert [x["status"] for x in body["results"]] == [
        "accepted", "duplicate", "conflict", "rejected", "rejected", "accepted", "conflict",
        "duplicate",
    ]
    assert [x["index"] for x in body["results"]] == list(range(len(items)))
    assert body["results"][3]["reason"].startswith("completion:")
    assert (body["accepted"], body["duplicate"], body["conflict"], body["rejected"]) == (2, 2, 2, 2)
    assert _count(env) == 3


def test_batch_accepts_a_bare_list(env, client):
    r = client.post("/v1/feedback/batch", json=[event(), event()], headers=env.headers("ingest"))
    assert r.status_code == 207 and r.json()["accepted"] == 2


def test_labels_prompt_forms_and_optional_fields_are_stored(env, client):
    when = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    ev = event(prompt="plain prompt", label="down", correction="better answer", comment="meh",
               trace_id="t-1", request_id="r-1", environment="staging",
               occurred_at=when.isoformat())
    assert client.post("/v1/feedback", json=ev, headers=env.headers()).status_code == 201
    ev2 = event(label=True, user_id=None)
    assert client.post("/v1/feedback", json=ev2, headers=env.headers()).status_code == 201
    items = client.get("/v1/feedback", headers=env.headers("read")).json()["items"]
    by_id = {i["event_id"]: i for i in items}
    got = by_id[ev["event_id"]]
    assert got["label"] == "down" and got["prompt"] == "plain prompt"
    assert (got["correction"], got["comment"], got["trace_id"], got["request_id"],
            got["environment"]) == ("better answer", "meh", "t-1", "r-1", "staging")
    assert datetime.fromisoformat(got["occurred_at"]) == when
    assert got["metadata"] == {"ui": "thumbs", "latency_ms": 120}
    assert by_id[ev2["event_id"]]["label"] == "up"
    assert by_id[ev2["event_id"]]["prompt"] == ev2["prompt"]
    assert by_id[ev2["event_id"]]["user_hash"] is None


def test_user_id_is_stored_as_keyed_hash_only(env, client):
    ev = event(user_id="bob@example.com")
    client.post("/v1/feedback", json=ev, headers=env.headers())
    with env.app.state.engine.connect() as conn:
        row = conn.execute(select(feedback_events)).mappings().one()
    expected = hash_user_id("bob@example.com", env.settings.user_id_key)
    assert row["user_hash"] == expected and len(expected) == 64
    assert all("bob@example.com" not in str(v) for v in row.values())
    assert hash_user_id("bob@example.com", "another-key-0123456789") != expected


def test_replaces_only_latest_vote_counts(env, client):
    first = event(label="up")
    second = event(label="down", replaces=first["event_id"])
    third = event(label="up", replaces=second["event_id"])
    other = event(label="down")
    h = env.headers()
    for ev in (first, second, third, other):
        assert client.post("/v1/feedback", json=ev, headers=h).status_code == 201
    bal = client.get("/v1/balance", headers=h).json()
    assert (bal["n_desirable"], bal["n_undesirable"]) == (1, 1)
    lines = client.get("/v1/feedback/export", headers=h).text.splitlines()
    assert len(lines) == 2
    ids = [i["event_id"] for i in client.get("/v1/feedback", headers=h).json()["items"]]
    assert sorted(ids) == sorted([third["event_id"], other["event_id"]])
    all_ids = client.get("/v1/feedback", params={"include_replaced": "true"}, headers=h).json()
    assert len(all_ids["items"]) == 4


def test_only_the_same_users_vote_replaces_one(env, client):
    """`replaces` names this user's earlier vote: another user's event naming it (a client bug,
    or someone else's key) must not drop it from the counts and the training data."""
    h = env.headers()
    mine = event(label="up", user_id="u-1")
    theirs = event(label="down", user_id="u-2", replaces=mine["event_id"])
    anon = event(label="up", user_id=None)
    anon_again = event(label="down", user_id=None, replaces=anon["event_id"])
    for ev in (mine, theirs, anon, anon_again):
        assert client.post("/v1/feedback", json=ev, headers=h).status_code == 201, ev
    ids = {i["event_id"] for i in client.get("/v1/feedback", headers=h).json()["items"]}
    assert ids == {mine["event_id"], theirs["event_id"], anon_again["event_id"]}
    bal = client.get("/v1/balance", headers=h).json()
    assert (bal["n_desirable"], bal["n_undesirable"]) == (1, 2)
    again = event(label="down", user_id="u-1", replaces=mine["event_id"])  # the user's own change
    client.post("/v1/feedback", json=again, headers=h)
    ids = {i["event_id"] for i in client.get("/v1/feedback", headers=h).json()["items"]}
    assert mine["event_id"] not in ids and again["event_id"] in ids


def test_replacement_arriving_first_still_wins(env, client):
    old = event(label="up")
    new = event(label="down", replaces=old["event_id"])
    h = env.headers()
    client.post("/v1/feedback", json=new, headers=h)
    client.post("/v1/feedback", json=old, headers=h)
    bal = client.get("/v1/balance", headers=h).json()
    assert (bal["n_desirable"], bal["n_undesirable"]) == (0, 1)


def test_listing_filters_and_keyset_pagination(env, client):
    base = datetime(2024, 3, 1, tzinfo=UTC)
    evs = []
    for i in range(25):
        evs.append(event(
            occurred_at=(base + timedelta(hours=i)).isoformat(),
            label="up" if i % 3 else "down",
            model_version="m-a" if i < 10 else "m-b",
            source="web" if i % 2 else "mobile",
        ))
    # Two events at the same instant: the id breaks the tie.
    evs.append(event(occurred_at=(base + timedelta(hours=5)).isoformat(), model_version="m-a"))
    r = client.post("/v1/feedback/batch", json={"events": evs}, headers=env.headers("ingest"))
    assert r.json()["accepted"] == 26
    h = env.headers("read")
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/feedback", params=params, headers=h).json()
        seen += [i["event_id"] for i in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 4 and len(seen) == 26 and len(set(seen)) == 26
    times = [datetime.fromisoformat(i["occurred_at"]) for i in
             client.get("/v1/feedback", params={"limit": 100}, headers=h).json()["items"]]
    assert times == sorted(times, reverse=True)

    def ids(**params):
        return {i["event_id"] for i in
                client.get("/v1/feedback", params={"limit": 100, **params}, headers=h)
                .json()["items"]}

    assert len(ids(model_version="m-a")) == 11
    assert ids(label="down") == {e["event_id"] for e in evs if e["label"] == "down"}
    assert ids(source="mobile") == {e["event_id"] for e in evs if e["source"] == "mobile"}
    window = ids(since=(base + timedelta(hours=3)).isoformat(),
                 until=(base + timedelta(hours=6)).isoformat())
    assert len(window) == 4  # hours 3, 4, 5 (twice); until is exclusive
    assert client.get("/v1/feedback", params={"cursor": "garbage!"}, headers=h).status_code == 422
    assert client.get("/v1/feedback", params={"label": "sideways"}, headers=h).status_code == 422


def test_export_is_trl_unpaired_jsonl(env, client):
    h = env.headers()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    evs = [event(prompt="p1", completion="c1", label="up"),
           event(prompt=chat, completion="c2", label="down", correction="Hello!"),
           event(prompt="p3", completion="c3", label="up", model_version="other")]
    client.post("/v1/feedback/batch", json={"events": evs}, headers=h)
    r = client.get("/v1/feedback/export", headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [orjson.loads(line) for line in r.text.splitlines()]
    assert {tuple(sorted(x)) for x in rows} == {("completion", "label", "prompt")}
    assert {(str(x["prompt"]), x["completion"], x["label"]) for x in rows} == {
        ("p1", "c1", True), (str(chat), "c2", False), ("p3", "c3", True)}
    r = client.get("/v1/feedback/export", params={"model_version": "other"}, headers=h)
    assert len(r.text.splitlines()) == 1
    r = client.get("/v1/feedback/export", params={"corrections": "true"}, headers=h)
    rows = [orjson.loads(line) for line in r.text.splitlines()]
    assert {"prompt": chat, "completion": "Hello!", "label": True} in rows and len(rows) == 4


def test_a_blank_correction_is_no_correction(env, client):
    """The vote is kept; the blank text is neither stored nor trained on as desirable."""
    from service.queries import Filters, iter_training_examples

    h = env.headers()
    evs = [event(label="down", correction=c) for c in ("", "   ", "\n\t")]
    r = client.post("/v1/feedback/batch", json={"events": evs}, headers=h)
    assert [i["status"] for i in r.json()["results"]] == ["accepted"] * 3, r.text
    with env.app.state.engine.connect() as conn:
        rows = list(iter_training_examples(conn, Filters(), corrections=True))
    assert len(rows) == 3 and not any(x["label"] for x in rows), rows
    listed = client.get("/v1/feedback", headers=h).json()
    assert [x["correction"] for x in listed["items"]] == [None] * 3
    # A retry of the same event is still a duplicate.
    r = client.post("/v1/feedback/batch", json={"events": evs[1:2]}, headers=h)
    assert r.json()["results"][0]["status"] == "duplicate", r.text


def test_a_blank_correction_stored_earlier_is_neither_counted_nor_trained_on(env, client):
    """Rows stored before blank corrections were refused at ingestion: the class count and the
    examples agree, and neither takes the blank text as a desirable answer."""
    from sqlalchemy import update

    from service.models import feedback_events as fe
    from service.queries import Filters, iter_training_examples
    from service.selection import Selection, count_selection, iter_selected

    h = env.headers()
    evs = [event(label="down", correction="real fix"), event(label="down"), event(label="up")]
    client.post("/v1/feedback/batch", json={"events": evs}, headers=h)
    with env.app.state.engine.begin() as conn:
        conn.execute(update(fe).where(fe.c.event_id == evs[1]["event_id"]).values(correction="   "))
    with env.app.state.engine.connect() as conn:
        sel = Selection(Filters(), holdout_fraction=0.0)
        selected = list(iter_selected(conn, sel, corrections=True))
        counts = count_selection(conn, sel, corrections=True)
        exported = list(iter_training_examples(conn, Filters(), corrections=True))
    assert sorted(x["completion"] for x in selected if x["label"]) == sorted([evs[2]["completion"], "real fix"])
    assert (counts.n_desirable, counts.n_undesirable) == (2, 2)
    assert sum(x["label"] for x in exported) == 2 and len(exported) == 4


def test_export_reads_with_trl_dataset_format(env, client, tmp_path):
    """The file loads with `datasets` as TRL's unpaired preference format expects."""
    import datasets

    h = env.headers()
    client.post("/v1/feedback/batch", json={"events": [
        event(prompt="a", completion="b", label="up"),
        event(prompt="c", completion="d", label="down")]}, headers=h)
    path = tmp_path / "kto.jsonl"
    path.write_bytes(client.get("/v1/feedback/export", headers=h).content)
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert set(ds.column_names) == {"prompt", "completion", "label"}
    assert sorted(ds["label"]) == [False, True]


def test_import_pairs_is_idempotent(env, client):
    h = env.headers("ingest")
    pairs = {"pairs": [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away",
         "model_version": "base-1"},
        {"prompt": "bad", "chosen": "", "rejected": "x"},
    ]}
    r = client.post("/v1/feedback/import-pairs", json=pairs, headers=h)
    assert r.status_code == 207, r.text
    body = r.json()
    assert (body["events_accepted"], body["pairs_rejected"]) == (4, 1)
    assert body["results"][2]["reason"].startswith("chosen:")
    r = client.post("/v1/feedback/import-pairs", json=pairs, headers=h)
    assert (r.json()["events_accepted"], r.json()["events_duplicate"]) == (0, 4)
    assert _count(env) == 4
    bal = client.get("/v1/balance", headers=env.headers("read")).json()
    assert (bal["n_desirable"], bal["n_undesirable"], bal["allowed"]) == (2, 2, True)


def test_a_pair_whose_answers_are_the_same_is_refused_by_name(env, client):
    pairs = {"pairs": [{"prompt": "2+2?", "chosen": "4", "rejected": "4"},
                       {"prompt": "2+3?", "chosen": "5", "rejected": "6"}]}
    r = client.post("/v1/feedback/import-pairs", json=pairs, headers=env.headers("ingest"))
    assert r.status_code == 207, r.text
    first, second = r.json()["results"]
    assert first["status"] == "rejected" and first["reason"].startswith("rejected:"), first
    assert second["status"] == "stored" and _count(env) == 2


def test_balance_and_daily(env, client):
    h = env.headers()
    day1 = datetime(2024, 6, 1, 23, 0, tzinfo=UTC)
    day2 = datetime(2024, 6, 2, 1, 0, tzinfo=UTC)
    evs = ([event(label="up", occurred_at=day1.isoformat()) for _ in range(2)]
           + [event(label="down", occurred_at=day1.isoformat()) for _ in range(4)]
           + [event(label="down", occurred_at=day2.isoformat(), model_version="x")])
    client.post("/v1/feedback/batch", json={"events": evs}, headers=h)
    bal = client.get("/v1/balance", params={"until": "2024-06-02T00:00:00Z"}, headers=h).json()
    assert (bal["n_desirable"], bal["n_undesirable"], bal["total"]) == (2, 4, 6)
    # 1:2 is outside [1, 1.5]: the minority class is raised to the target.
    assert bal["lambda_u"] == 1.0 and abs(bal["lambda_d"] - 2.0) < 1e-9
    assert abs(bal["achieved_ratio"] - 1.0) < 1e-9 and bal["allowed"] and bal["reason"] is None
    none = client.get("/v1/balance", params={"model_version": "x"}, headers=h).json()
    assert not none["allowed"] and "desirable" in none["reason"]
    daily = client.get("/v1/balance/daily", headers=h).json()["days"]
    assert daily == [
        {"day": "2024-06-01", "n_desirable": 2, "n_undesirable": 4},
        {"day": "2024-06-02", "n_desirable": 0, "n_undesirable": 1},
    ]


def test_sqlite_runs_wal_with_busy_timeout(sqlite_url):
    from service.db import make_engine
    from service.settings import Settings

    engine = make_engine(Settings(database_url=sqlite_url, sqlite_busy_timeout_ms=4321))
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 4321
    engine.dispose()


def test_iter_training_examples_matches_export(env, client):
    from service.queries import Filters, iter_training_examples

    h = env.headers()
    old = event(label="up", correction="fixed")
    evs = [old, event(label="down", replaces=old["event_id"], correction="fixed too"),
           event(label="up")]
    client.post("/v1/feedback/batch", json={"events": evs}, headers=h)
    with env.app.state.engine.connect() as conn:
        rows = list(iter_training_examples(conn, Filters(), corrections=True))
    exported = [orjson.loads(x) for x in client.get(
        "/v1/feedback/export", params={"corrections": "true"}, headers=h).text.splitlines()]
    assert rows == exported and len(rows) == 3  # the replaced vote and its correction are out
    assert {"prompt": evs[1]["prompt"], "completion": "fixed too", "label": True} in rows
