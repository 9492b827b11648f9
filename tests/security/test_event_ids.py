"""A deleted event's id is never handed out again (SQLite: AUTOINCREMENT, migration 0010).

Jobs freeze their data as ``(min_event_id, max_event_id]``: an id reused after the newest events
were erased would put an event that arrived later inside a queued (or retried) job's data, and
inside the erasure lineage of that job. Both backends; the real create_job / iter_selected path.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from service import erasure
from service.ingest import hash_user_id
from service.models import erasures, feedback_events
from tests.security.test_erasure import NOW, add_events, env_with, make_job, selected_ids, votes


def _delete_newest(env, how: str) -> None:
    engine = env.app.state.engine
    if how == "user":
        res = erasure.erase_user(engine, env.settings, hash_user_id("carol", env.settings.user_id_key),
                                 actor="test")
    else:
        res = erasure.apply_retention(engine, env.make_settings(feedback_retention_days=30))
    assert res is not None and res.n_events == 3


@pytest.mark.parametrize("how", ["user", "retention"])
def test_the_ids_of_erased_newest_events_are_not_given_again(rights_env, how):
    env = env_with(rights_env, holdout_fraction=0.0, max_events_per_user=0)
    engine = env.app.state.engine
    kept = add_events(env, votes(["alice", "bob"], 8))
    # The newest events: carol's (a user erasure), or late copies of old ones (retention).
    old = (NOW - timedelta(days=40)).isoformat()
    newest = add_events(env, [{"user_id": "carol", "label": "up", "occurred_at": old}
                              for _ in range(3)])
    used = kept + newest
    job = make_job(env, status="queued", attempt=0)
    assert job["max_event_id"] == max(used)
    before = selected_ids(env, job)

    _delete_newest(env, how)
    [new] = add_events(env, [{"user_id": "dave", "label": "down"}])

    assert new > max(used), (new, used)
    # The queued job (and any retry of it: same frozen range) reads only what it froze.
    assert selected_ids(env, job) == before - set(newest)
    assert new not in selected_ids(env, job) | selected_ids(env, job, "holdout")
    # Erasing the newcomer is no concern of the job: it never held that event.
    res = erasure.erase_user(engine, env.settings, hash_user_id("dave", env.settings.user_id_key),
                             actor="test")
    assert res.n_events == 1 and job["id"] not in res.jobs
    with engine.connect() as conn:
        row = conn.execute(select(erasures).where(erasures.c.id == res.erasure_id)).mappings().one()
        assert row["min_event_id"] == row["max_event_id"] == new
        assert conn.execute(select(feedback_events.c.id)).scalars().all() == sorted(kept)
