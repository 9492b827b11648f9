"""A model line trains on its own feedback: the `served` scope (service.lines) keeps only the
events whose model_version the line served (`<line>-base`, its checkpoints' versions), by an
exact match: line `a` never takes `a-b`'s or `a_b`'s events. `default` keeps every event.

Each backend gets a database of its own (jobs and lines are created freely here)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, inspect, select, text, update

from service import jobs, migrate, registry
from service.erasure import job_impacts
from service.job_schemas import JobFilters, JobParams
from service.lines import put_line
from service.models import checkpoints as ck
from service.models import feedback_events as fe
from service.models import model_lines as ml
from service.queries import Filters
from service.selection import iter_selected, max_event_id
from service.settings import Settings
from tests.conftest import PG_ADMIN_URL, Env, _with_dbname, make_env, migrated_pg_database


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def lenv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Env]:
    overrides = dict(holdout_fraction=0.0, max_events_per_user=0, min_distinct_users=1,
                     retrain_min_events=5, broker_url="memory://", serving_cache_ttl_s=0.0)
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('lines') / 'lines.db'}"
        migrate.upgrade(Settings(database_url=url))
        yield make_env("sqlite", url, **overrides)
        return
    gen = migrated_pg_database("prospect_lines")
    url = next(gen)
    env = make_env("postgres", url, **overrides)
    yield env
    env.app.state.engine.dispose()
    next(gen, None)  # drops it (close() would skip the code after its yield)


@pytest.fixture
def lc(lenv: Env) -> Iterator[TestClient]:
    with TestClient(lenv.app, raise_server_exceptions=False) as c:
        yield c


def _engine(env: Env) -> Engine:
    return env.app.state.engine


def _lines(env: Env, **scopes: str) -> dict[str, str]:
    """Three lines whose names a prefix or LIKE match would confuse: `p`, `p-b`, `p_b`
    (`_` is a LIKE wildcard: `p_b-%` matches `p-b-base`). New lines: scope `served`."""
    p = f"t{secrets.token_hex(3)}"
    names = {"a": p, "ab": f"{p}-b", "a_b": f"{p}_b"}
    with _engine(env).begin() as conn:
        for key, name in names.items():
            row = put_line(conn, name, "toy-base", scopes.get(key))
            assert row["feedback"] == scopes.get(key, "served")
    return names


def _checkpoint(env: Env, line: str, stage: str = "retired") -> dict[str, Any]:
    """A registered checkpoint row, named as the registry names it."""
    now = registry._now()
    with _engine(env).begin() as conn:
        cid = conn.execute(ck.insert().values(
            line=line, model_version=f"pending-{secrets.token_hex(8)}", base_model="toy-base",
            artifact_path=f"/nowhere/{line}", format="full", stage=stage, created_at=now,
            stage_changed_at=now).returning(ck.c.id)).scalar_one()
        conn.execute(update(ck).where(ck.c.id == cid)
                     .values(model_version=registry.model_version(line, cid)))
        return registry.get_checkpoint(conn, cid)


def _post(client: TestClient, env: Env, version: str, n: int, tag: str = "",
          users: int = 3) -> list[str]:
    """n events of one version, both labels, a few users; their event ids."""
    events = [{"event_id": f"{version}{tag}-{i}-{secrets.token_hex(3)}",
               "prompt": f"q {version} {i}", "completion": f"{version} answer {i}",
               "label": "up" if i % 2 else "down", "model_version": version,
               "user_id": f"user-{i % users}"} for i in range(n)]
    r = client.post("/v1/feedback/batch", json={"events": events}, headers=env.headers("ingest"))
    assert r.status_code == 207 and r.json()["accepted"] == n, r.text
    return [e["event_id"] for e in events]


def _ids(env: Env, event_ids: list[str]) -> set[int]:
    with _engine(env).connect() as conn:
        return set(conn.execute(select(fe.c.id).where(fe.c.event_id.in_(event_ids))).scalars())


def _job(env: Env, line: str, settings: Settings | None = None, **filters: Any
         ) -> dict[str, Any]:
    return jobs.create_job(_engine(env), settings or env.settings, line=line,
                           params=JobParams(), filters=JobFilters(**filters))


def _trained_ids(env: Env, job: dict[str, Any], settings: Settings | None = None) -> set[int]:
    """What the job's child reads (worker/job_child.py: iter_selected over selection_for)."""
    with _engine(env).connect() as conn:
        return {r["id"] for r in iter_selected(conn, jobs.selection_for(job, settings or env.settings))}


def _mixed_feedback(client: TestClient, env: Env, names: dict[str, str]
                    ) -> dict[str, list[str]]:
    """Events of every line's versions, plus versions no line served."""
    ab_ckpt = _checkpoint(env, names["ab"])["model_version"]
    a_ckpt = _checkpoint(env, names["a"])["model_version"]
    return {
        "a": _post(client, env, f"{names['a']}-base", 6) + _post(client, env, a_ckpt, 4),
        "ab": _post(client, env, f"{names['ab']}-base", 8) + _post(client, env, ab_ckpt, 6),
        "a_b": _post(client, env, f"{names['a_b']}-base", 10),
        # free text, and a checkpoint-looking version of `a` that no checkpoint has
        "other": _post(client, env, "m-2024-01", 5)
        + _post(client, env, f"{names['a']}-ckpt-999999", 4),
    }


def test_each_served_line_trains_only_on_its_own_versions(lc, lenv):
    names = _lines(lenv)
    ev = _mixed_feedback(lc, lenv, names)
    for key in ("a", "ab", "a_b"):
        job = _job(lenv, names[key])
        assert job["filters"]["feedback"] == "served"
        assert job["filters"]["max_checkpoint_id"] >= (0 if key == "a_b" else 1)
        own = _ids(lenv, ev[key])
        # frozen counts and the rows the child reads agree, and are exactly the line's own
        assert job["n_desirable"] + job["n_undesirable"] == len(own), key
        assert _trained_ids(lenv, job) == own, key
        jobs.request_cancel(_engine(lenv), job["id"])


def test_explicit_job_filters_still_narrow_a_served_line(lc, lenv):
    names = _lines(lenv)
    ev = _mixed_feedback(lc, lenv, names)
    job = _job(lenv, names["ab"], model_version=f"{names['ab']}-base")
    assert _trained_ids(lenv, job) == _ids(lenv, ev["ab"][:8])
    jobs.request_cancel(_engine(lenv), job["id"])
    # another line's version on this line: nothing of its own to train on
    with pytest.raises(jobs.JobRefused) as exc:
        _job(lenv, names["ab"], model_version=f"{names['a']}-base")
    assert exc.value.error == "too_few_users"


def test_an_all_line_and_default_read_every_event(lc, lenv):
    names = _lines(lenv, a="all")
    ev = _mixed_feedback(lc, lenv, names)
    everything = set().union(*(_ids(lenv, ids) for ids in ev.values()))
    job = _job(lenv, names["a"])
    assert job["filters"]["feedback"] == "all" and "max_checkpoint_id" not in job["filters"]
    assert _trained_ids(lenv, job) >= everything
    jobs.request_cancel(_engine(lenv), job["id"])
    with _engine(lenv).begin() as conn:
        assert put_line(conn, "default", "toy-base")["feedback"] == "all"
    job = _job(lenv, "default")
    assert _trained_ids(lenv, job) >= everything
    jobs.request_cancel(_engine(lenv), job["id"])


def test_a_job_freezes_which_checkpoints_count(lc, lenv):
    """A checkpoint registered after the job was created adds nothing to its rows, even for
    events (sent early, with a guessed version) inside its frozen id range."""
    names = _lines(lenv)
    own = _post(lc, lenv, f"{names['a']}-base", 6)
    job = _job(lenv, names["a"])
    later = _checkpoint(lenv, names["a"])
    assert later["id"] > job["filters"]["max_checkpoint_id"]
    _post(lc, lenv, later["model_version"], 4)
    with _engine(lenv).connect() as conn:
        frozen = {**job, "max_event_id": max_event_id(conn)}
    assert _trained_ids(lenv, frozen) == _ids(lenv, own)
    unfrozen = {**frozen, "filters": {**job["filters"], "max_checkpoint_id": None}}
    assert len(_trained_ids(lenv, unfrozen)) == 10
    jobs.request_cancel(_engine(lenv), job["id"])


def test_a_served_line_picks_up_feedback_of_its_promoted_checkpoint(lc, lenv):
    names = _lines(lenv)
    base = _post(lc, lenv, f"{names['a']}-base", 4)
    cand = _checkpoint(lenv, names["a"], stage="candidate")
    registry.promote(_engine(lenv), lenv.settings, cand["id"], "production", None,
                     registry.Actor("test"))
    with _engine(lenv).begin() as conn:
        served = registry.serving_state(conn, lenv.settings, names["a"]).choose("u1")
    assert served["model_version"] == f"{names['a']}-ckpt-{cand['id']}"
    promoted = _post(lc, lenv, served["model_version"], 6)
    _post(lc, lenv, f"{names['ab']}-base", 6)
    job = _job(lenv, names["a"])
    assert _trained_ids(lenv, job) == _ids(lenv, base + promoted)
    jobs.request_cancel(_engine(lenv), job["id"])


def test_retraining_check_counts_only_the_lines_own_events(lc, lenv):
    names = _lines(lenv)
    _post(lc, lenv, f"{names['a']}-base", 3)
    _post(lc, lenv, f"{names['ab']}-base", 8)
    _post(lc, lenv, f"{names['a_b']}-base", 8)
    _post(lc, lenv, "m-2024-01", 8)
    got = jobs.check_retraining(_engine(lenv), lenv.settings, names["a"])
    assert got.job_id is None and got.reason.startswith("3 new events"), got.reason
    got = jobs.check_retraining(_engine(lenv), lenv.settings, names["ab"])
    assert got.job_id is not None and got.reason == "8 new events", got.reason
    with _engine(lenv).connect() as conn:
        job = jobs.get_job(conn, got.job_id)
    assert job["n_desirable"] + job["n_undesirable"] == 8
    jobs.request_cancel(_engine(lenv), job["id"])


def test_the_gate_holds_out_only_the_lines_own_events(lc, lenv):
    settings = lenv.make_settings(holdout_fraction=0.5)
    names = _lines(lenv)
    for key in ("a", "ab", "a_b"):
        _post(lc, lenv, f"{names[key]}-base", 40, users=8)
    _post(lc, lenv, "m-2024-01", 40, users=8)
    job = _job(lenv, names["a"], settings)
    for scope in ("job", "all"):
        s = settings.model_copy(update={"gate_holdout_scope": scope})
        with _engine(lenv).connect() as conn:
            held = registry.holdout_examples(conn, s, job)
        assert held and {e["completion"].split(" answer ")[0] for e in held} == {
            f"{names['a']}-base"}, scope
    # train and held-out of the line together are all its events, disjoint
    assert len(held) + job["n_desirable"] + job["n_undesirable"] == 40
    jobs.request_cancel(_engine(lenv), job["id"])


def test_erasure_lineage_counts_only_what_the_lines_job_selected(lc, lenv):
    names = _lines(lenv)
    _post(lc, lenv, f"{names['a']}-base", 6, users=2)
    _post(lc, lenv, f"{names['ab']}-base", 6, users=2)
    job_a = _job(lenv, names["a"])
    with _engine(lenv).connect() as conn:
        rows = conn.execute(select(fe.c.id, fe.c.user_hash, fe.c.model_version)
                            .where(fe.c.model_version.in_([f"{names['a']}-base",
                                                           f"{names['ab']}-base"]))).all()
        user = rows[0].user_hash
        mine = [r for r in rows if r.user_hash == user]
        impacts = {i.job_id: i for i in job_impacts(conn, lenv.settings, 0, mine)}
    own = sum(1 for r in mine if r.model_version == f"{names['a']}-base")
    assert 0 < own < len(mine)
    assert impacts[job_a["id"]].n_trained == own
    jobs.request_cancel(_engine(lenv), job_a["id"])


def test_balance_with_a_line_counts_its_scope(lc, lenv):
    names = _lines(lenv)
    _post(lc, lenv, f"{names['a']}-base", 4)
    _post(lc, lenv, f"{names['ab']}-base", 6)
    h = lenv.headers("read")
    r = lc.get("/v1/balance", params={"line": names["a"]}, headers=h)
    assert r.status_code == 200, r.text
    assert (r.json()["total"], r.json()["line"], r.json()["feedback"]) == (4, names["a"], "served")
    r = lc.get("/v1/balance/daily", params={"line": names["ab"]}, headers=h)
    assert sum(d["n_desirable"] + d["n_undesirable"] for d in r.json()["days"]) == 6
    assert lc.get("/v1/balance", headers=h).json()["line"] is None
    r = lc.get("/v1/balance", params={"line": "no-such-line"}, headers=h)
    assert r.status_code == 404 and r.json()["errors"][0]["field"] == "line"
    r = lc.get("/v1/balance", params={"line": "Bad Name"}, headers=h)
    assert r.status_code == 422 and "line" in r.json()["errors"][0]["field"]


def test_put_and_get_lines_round_trip_the_scope(lc, lenv):
    admin, read = lenv.headers("admin"), lenv.headers("read")
    name = f"t{secrets.token_hex(3)}"
    r = lc.put(f"/v1/lines/{name}", json={"base_model": "m1"}, headers=admin)
    assert r.status_code == 200 and r.json()["feedback"] == "served", r.text
    r = lc.put(f"/v1/lines/{name}", json={"feedback": "all"}, headers=admin)
    assert r.status_code == 200 and r.json()["feedback"] == "all" and r.json()["base_model"] == "m1"
    # a base model change alone keeps the chosen scope
    r = lc.put(f"/v1/lines/{name}", json={"base_model": "m2"}, headers=admin)
    assert (r.json()["base_model"], r.json()["feedback"]) == ("m2", "all")
    lines = {x["name"]: x for x in lc.get("/v1/lines", headers=read).json()["lines"]}
    assert lines[name]["feedback"] == "all"
    r = lc.put(f"/v1/lines/{name}-x", json={"base_model": "m", "feedback": "mine"}, headers=admin)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.feedback", r.text
    r = lc.put(f"/v1/lines/{name}-y", json={"feedback": "all"}, headers=admin)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "base_model", r.text
    r = lc.put(f"/v1/lines/{name}-z", json={"base_model": "m", "feedback": "all"}, headers=admin)
    assert r.status_code == 200 and r.json()["feedback"] == "all"


def test_put_on_default_sets_the_scope_and_keeps_the_settings_base_model(lenv):
    """With PROSPECT_BASE_MODEL set, the default line's base model stays the setting's (409),
    but its scope may change, also before anything made the default row."""
    with _engine(lenv).begin() as conn:  # unless jobs name it, start without a default row
        conn.execute(text("DELETE FROM model_lines WHERE name = 'default' AND NOT EXISTS "
                          "(SELECT 1 FROM training_jobs WHERE line = 'default')"))
    env = make_env(lenv.backend, lenv.url, base_model="/models/configured")
    app, admin = env.app, env.headers("admin")
    with TestClient(app, raise_server_exceptions=False) as c:
        try:
            r = c.put("/v1/lines/default", json={"feedback": "served"}, headers=admin)
            assert r.status_code == 200, r.text
            assert (r.json()["base_model"], r.json()["feedback"]) == ("/models/configured", "served")
            r = c.put("/v1/lines/default", json={"base_model": "/elsewhere", "feedback": "all"},
                      headers=admin)
            assert r.status_code == 409 and r.json()["errors"][0]["field"] == "base_model"
            lines = {x["name"]: x for x in c.get("/v1/lines", headers=admin).json()["lines"]}
            assert lines["default"]["feedback"] == "served"
        finally:
            r = c.put("/v1/lines/default", json={"feedback": "all"}, headers=admin)
            assert r.status_code == 200 and r.json()["feedback"] == "all"
    app.state.engine.dispose()


# ---- the migration: existing lines keep reading every event

def _migrate_existing_lines(url: str) -> None:
    from service.db import make_engine

    s = Settings(database_url=url)
    migrate.upgrade(s, "0008")
    engine = make_engine(s)
    with engine.begin() as conn:
        for name in ("default", "support-bot"):
            conn.execute(text("INSERT INTO model_lines (name, base_model, created_at, updated_at) "
                              "VALUES (:n, 'm', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"n": name})
    migrate.upgrade(s)
    with engine.begin() as conn:
        got = dict(conn.execute(select(ml.c.name, ml.c.feedback)).all())
        assert got == {"default": "all", "support-bot": "all"}
        assert put_line(conn, "new-line", "m")["feedback"] == "served"
    migrate.downgrade(s, "0008")
    with engine.connect() as conn:
        cols = {c["name"] for c in inspect(conn).get_columns("model_lines")}
    assert "feedback" not in cols
    migrate.upgrade(s)
    engine.dispose()


def test_migration_gives_existing_lines_scope_all_on_sqlite(tmp_path):
    _migrate_existing_lines(f"sqlite:///{tmp_path / 'm.db'}")


def test_migration_gives_existing_lines_scope_all_on_postgres(pg_url):
    import psycopg

    name = f"prospect_mig_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        _migrate_existing_lines(_with_dbname(PG_ADMIN_URL, name))
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_scope_condition_matches_versions_exactly_not_by_pattern():
    """Compiled SQL: an equality/IN on model_version, no LIKE (line names may hold `_`)."""
    from sqlalchemy.dialects import postgresql, sqlite

    stmt = Filters(served_by="a_b", max_checkpoint_id=3).apply(select(fe.c.id))
    for dialect in (postgresql.dialect(), sqlite.dialect()):
        sql = str(stmt.compile(dialect=dialect)).upper()
        assert "LIKE" not in sql and "CHECKPOINTS.LINE =" in sql
    assert "= ANY(ARRAY(" in str(stmt.compile(dialect=postgresql.dialect())).upper()
