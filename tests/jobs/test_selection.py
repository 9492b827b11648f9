"""Which events a job trains on: held-out split, per-user cap, frozen range (both backends)."""

from __future__ import annotations

from sqlalchemy import text

from service.queries import Filters
from service.selection import (
    SPLIT_BUCKETS,
    Selection,
    count_selection,
    iter_selected,
    max_event_id,
    split_bucket,
)
from tests.service.helpers import event


def _post(client, env, events):
    for k in range(0, len(events), 1000):
        r = client.post("/v1/feedback/batch", json={"events": events[k:k + 1000]},
                        headers=env.headers("ingest"))
        assert r.status_code == 207 and r.json()["accepted"] == len(events[k:k + 1000]), r.text


def test_split_bucket_is_stable():
    # Pinned: stored rows and every past job's held-out set depend on these values.
    # sha256("a") = ca978112ca1bbdca...: 0xca978112 = 3398926610.
    assert split_bucket("a") == 3398926610 % SPLIT_BUCKETS == 6610
    assert all(0 <= split_bucket(f"e{i}") < SPLIT_BUCKETS for i in range(1000))


def test_holdout_is_disjoint_and_about_five_percent(client, env):
    _post(client, env, [event(event_id=f"h{i}", user_id=f"u{i % 50}",
                              label="up" if i % 3 else "down") for i in range(4000)])
    with env.app.state.engine.connect() as conn:
        train = Selection(Filters(), holdout_fraction=0.05)
        hold = Selection(Filters(), holdout_fraction=0.05, split="holdout")
        t_ids = {r["id"] for r in iter_selected(conn, train)}
        h_ids = {r["id"] for r in iter_selected(conn, hold)}
        tc, hc = count_selection(conn, train), count_selection(conn, hold)
    assert not t_ids & h_ids and len(t_ids | h_ids) == 4000
    assert 0.04 < len(h_ids) / 4000 < 0.06
    assert tc.n_desirable + tc.n_undesirable == len(t_ids)
    assert hc.n_desirable + hc.n_undesirable == len(h_ids)
    # The split is a property of the event: re-asking gives the same held-out set.
    with env.app.state.engine.connect() as conn:
        again = {r["id"] for r in iter_selected(conn, hold)}
    assert again == h_ids


def test_per_user_cap_keeps_each_users_latest(client, env):
    flood = [event(event_id=f"f{i}", user_id="flooder", label="down") for i in range(300)]
    normal = [event(event_id=f"n{i}", user_id=f"user{i}", label="up") for i in range(40)]
    _post(client, env, flood + normal)
    sel = Selection(Filters(), holdout_fraction=0.0, max_events_per_user=25)
    with env.app.state.engine.connect() as conn:
        c = count_selection(conn, sel)
        rows = list(iter_selected(conn, sel))
        latest = [r.id for r in conn.execute(text(
            "SELECT id FROM feedback_events WHERE event_id LIKE 'f%' ORDER BY id DESC LIMIT 25"))]
    assert c.n_undesirable == 25 and c.n_desirable == 40 and c.n_users == 41
    assert c.n_capped == 275
    assert len(rows) == 65
    assert {r["id"] for r in rows if not r["label"]} == set(latest)


def test_frozen_range_ignores_later_events_and_replacements(client, env):
    _post(client, env, [event(event_id=f"a{i}", label="up") for i in range(10)])
    with env.app.state.engine.connect() as conn:
        frozen = Selection(Filters(), holdout_fraction=0.0).frozen(0, max_event_id(conn))
        before = count_selection(conn, frozen)
    # Later: new events, and a vote that replaces one of the frozen ones.
    _post(client, env, [event(event_id=f"b{i}", label="down") for i in range(5)]
          + [event(event_id="a0-fix", replaces="a0", label="down")])
    with env.app.state.engine.connect() as conn:
        after = count_selection(conn, frozen)
        live = count_selection(conn, Selection(Filters(), holdout_fraction=0.0))
    assert (after.n_desirable, after.n_undesirable) == (before.n_desirable,
                                                       before.n_undesirable) == (10, 0)
    assert (live.n_desirable, live.n_undesirable) == (9, 6)


def test_corrections_enter_as_desirable(client, env):
    _post(client, env, [event(event_id="c1", label="down", correction="It is 2.")])
    with env.app.state.engine.connect() as conn:
        rows = list(iter_selected(conn, Selection(Filters(), holdout_fraction=0.0),
                                  corrections=True))
    assert [(r["completion"], r["label"]) for r in rows][-1] == ("It is 2.", True)
    assert len(rows) == 2


def test_counts_with_corrections_match_what_is_trained(client, env):
    """λD/λU are computed from these counts: with corrections on, each stored correction is one
    more desirable example the job trains on (a helper's review: the weights missed them)."""
    _post(client, env, [event(event_id="k1", label="up"), event(event_id="k2", label="down", correction="2."),
                        event(event_id="k3", label="down", correction="3."), event(event_id="k4", label="down")])
    sel = Selection(Filters(), holdout_fraction=0.0)
    with env.app.state.engine.connect() as conn:
        plain, corrected = count_selection(conn, sel), count_selection(conn, sel, corrections=True)
        trained = [r["label"] for r in iter_selected(conn, sel, corrections=True)]
    assert (plain.n_desirable, plain.n_undesirable) == (1, 3)
    assert (corrected.n_desirable, corrected.n_undesirable) == (trained.count(True), trained.count(False)) == (3, 3)
