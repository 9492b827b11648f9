"""Hostile input: schemathesis against the OpenAPI schema, every operation, with a key of each
scope and with none. Zero 5xx, and every answer must match what the schema documents
(status code, content type, headers, body).

The app runs in-process (ASGI) on a seeded SQLite database: events, two lines, jobs with
metrics, checkpoints, a π_ref snapshot, rollout events, a notification and an erasure, so the
read endpoints render real rows (a seeded probe also calls every operation with the ids that
exist). Bounded: a few dozen examples per operation and key, about a minute in all.

Two of schemathesis's checks are left out on purpose, with the reason:
* ``positive_data_acceptance``: rules JSON Schema cannot express answer 422 on schema-valid
  input (opaque cursors, "lambda_d and lambda_u together", occurred_at at most 5 minutes ahead,
  a non-blank completion);
* ``negative_data_rejection``: the batch endpoints answer 207 with per-item rejections by
  design (one bad event must not drop the good ones), and query datetimes also accept Unix
  timestamps.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, update

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

from tests.conftest import Env  # noqa: E402
from tests.security.conftest import sqlite_env  # noqa: E402
from tests.security.test_scopes import REQUIRED, allowed  # noqa: E402

pytestmark = pytest.mark.slow

#: Examples per (operation, key) where the key may call the operation; fewer where auth
#: answers first (401/403 cost nothing to check). PROSPECT_FUZZ_EXAMPLES scales a deeper run.
FULL = int(os.environ.get("PROSPECT_FUZZ_EXAMPLES", "25"))
SHORT = max(3, FULL // 6)
EXCLUDED = [openapi_checks.positive_data_acceptance, openapi_checks.negative_data_rejection]
AUTHS = ("none", "ingest", "read", "admin")


def seed(env: Env) -> None:
    """Rows behind every read endpoint (ids 1 and 2 exist for jobs, checkpoints, ...)."""
    from service import erasure, jobs, notify, registry
    from service.ingest import hash_user_id, ingest_items
    from service.job_schemas import JobFilters, JobParams
    from service.lines import put_line
    from service.models import checkpoints, job_metrics, reference_snapshots, training_jobs
    from tests.service.helpers import event

    engine, settings_ = env.app.state.engine, env.settings
    now = datetime.now(UTC)
    items = [event(event_id=f"fz-{i}", user_id=f"user-{i % 4}",
                   label="up" if i % 3 else "down", correction="Better." if i % 5 == 0 else None,
                   comment="ok" if i % 7 == 0 else None,
                   occurred_at=(now - timedelta(hours=i)).isoformat()) for i in range(40)]
    outs = ingest_items(items, env.app.state.models["FeedbackIn"], settings_, engine)
    assert all(o.status == "accepted" for o in outs)
    with engine.begin() as conn:
        put_line(conn, "default", "toy-base")
        put_line(conn, "beta", "toy-base", feedback="all")  # the events' version is no line's
    job = jobs.create_job(engine, settings_, line="default", params=JobParams(),
                          filters=JobFilters())
    queued = jobs.create_job(engine, settings_, line="beta", params=JobParams(),
                             filters=JobFilters())
    with engine.begin() as conn:
        snap = conn.execute(insert(reference_snapshots).values(
            line="default", status="ready", source="toy-base", content_hash="0" * 64,
            path=str(Path(settings_.artifacts_root) / "snap-1"), size_bytes=10,
            created_at=now, finished_at=now).returning(reference_snapshots.c.id)).scalar_one()
        conn.execute(update(training_jobs).where(training_jobs.c.id == job["id"]).values(
            status="succeeded", attempt=1, step=2, total_steps=2, started_at=now,
            finished_at=now, reference_snapshot_id=snap,
            result={"final_loss": 0.5}))
        for step in (1, 2):
            conn.execute(insert(job_metrics).values(
                job_id=job["id"], step=step, attempt=1, created_at=now,
                metrics={"step": step, "loss": 0.7 - 0.1 * step, "kl": 0.01}))
        ck = conn.execute(insert(checkpoints).values(
            line="default", model_version="pending-name", job_id=job["id"],
            reference_snapshot_id=snap, base_model="toy-base",
            artifact_path=str(Path(settings_.artifacts_root) / "ckpt-1"), format="full",
            stage="production", metrics={"margin": 0.3}, created_at=now,
            stage_changed_at=now, evaluated_at=now).returning(checkpoints.c.id)).scalar_one()
        conn.execute(update(checkpoints).where(checkpoints.c.id == ck)
                     .values(model_version=registry.model_version("default", ck)))
        registry.record_event(conn, line="default", checkpoint_id=ck, action="production",
                              actor=registry.SYSTEM, from_stage="candidate",
                              to_stage="production", details={"why": "seed"})
        notify.enqueue(conn, settings_, "promoted", {"checkpoint_id": ck})
    erasure.erase_user(engine, settings_, hash_user_id("user-3", settings_.user_id_key),
                       actor="seed", reason="seed")
    assert queued["status"] == "queued"


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory, sec_template: Any) -> Any:
    tmp = tmp_path_factory.mktemp("fuzz")
    env = sqlite_env(tmp, sec_template, base_model="toy-base", rate_limit_ingest_per_s=0,
                     rate_limit_read_per_s=0, rate_limit_admin_per_s=0, key_cache_ttl_s=60,
                     webhook_url="http://127.0.0.1:9/hook")
    seed(env)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = schemathesis.openapi.from_asgi("/openapi.json", env.app)
    yield env, schema
    env.app.state.engine.dispose()


def _headers(env: Env, auth: str) -> dict[str, str]:
    return {} if auth == "none" else env.headers(auth)


def _may_call(label: str, auth: str) -> bool:
    method, path = label.split(" ", 1)
    required = REQUIRED.get((method, path))
    if required is None:  # public
        return True
    return auth != "none" and allowed(required, auth)


def _report(failures: dict[tuple[str, str], list[str]]) -> str:
    out = []
    for (label, auth), msgs in sorted(failures.items()):
        out.append(f"== {label} [{auth}]")
        out.extend(m[:2000] for m in msgs)
    return "\n".join(out)


def _fuzz(env: Env, schema: Any, mode: GenerationMode) -> dict[tuple[str, str], list[str]]:
    failures: dict[tuple[str, str], list[str]] = defaultdict(list)
    for result in schema.get_all_operations():
        op = result.ok()
        for auth in AUTHS:
            headers = _headers(env, auth)
            n = FULL if _may_call(op.label, auth) else SHORT

            @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck),
                      phases=[Phase.explicit, Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                try:
                    case.call_and_validate(headers=headers, excluded_checks=EXCLUDED)
                except (Failure, FailureGroup, AssertionError) as exc:
                    if len(failures[(op.label, auth)]) < 2:
                        failures[(op.label, auth)].append(str(exc))

            try:
                run()
            except Unsatisfiable:
                pass  # nothing to negate (no parameters, no body)
    return failures


def test_positive_inputs_never_5xx_and_match_the_schema(fuzz):
    env, schema = fuzz
    failures = _fuzz(env, schema, GenerationMode.POSITIVE)
    assert not failures, _report(failures)


def test_negative_inputs_never_5xx_and_match_the_schema(fuzz):
    env, schema = fuzz
    failures = _fuzz(env, schema, GenerationMode.NEGATIVE)
    assert not failures, _report(failures)


#: Path parameters that name seeded rows, and bodies a client would send.
SEEDED_PATH = {"job_id": 1, "checkpoint_id": 1, "snapshot_id": 1, "erasure_id": 1,
               "name": "default"}
SEEDED_BODY: dict[str, Any] = {
    "POST /v1/feedback": {"event_id": "probe-1", "prompt": "p", "completion": "c",
                          "label": "up", "model_version": "v", "user_id": "probe-user"},
    "POST /v1/feedback/batch": {"events": [{"event_id": "probe-2", "prompt": "p",
                                            "completion": "c", "label": "down",
                                            "model_version": "v"}]},
    "POST /v1/feedback/import-pairs": {"pairs": [{"prompt": "p", "chosen": "a",
                                                  "rejected": "b"}]},
    "POST /v1/jobs": {"line": "default"},
    "POST /v1/references": {"line": "default"},
    "PUT /v1/lines/{name}": {"base_model": "toy-base"},
    "POST /v1/checkpoints/{checkpoint_id}/promote": {"stage": "canary", "percent": 10},
    "POST /v1/rollback": {"line": "default", "target": "canary"},
    "POST /v1/storage/cleanup": {"dry_run": True},
    "POST /v1/serve": {"line": "default", "user_id": "probe-user"},
    "POST /v1/erasures": {"user_id": "user-2", "reason": "probe"},
}
#: State-changing probes that would remove the seeded rows the reads need: run last.
LAST = ("DELETE /v1/references/{snapshot_id}", "POST /v1/jobs/{job_id}/cancel")


def test_every_operation_on_seeded_rows_matches_the_schema(fuzz):
    """Deterministic calls with ids that exist, so success bodies with real rows (lineage,
    checkpoints with metrics, job rows) are validated too, not only empty pages."""
    env, schema = fuzz
    ops = sorted((r.ok() for r in schema.get_all_operations()),
                 key=lambda o: (o.label in LAST, o.label))
    failures: dict[tuple[str, str], list[str]] = defaultdict(list)
    statuses = {}
    for op in ops:
        params = {p.name: SEEDED_PATH[p.name] for p in op.path_parameters}
        kwargs: dict[str, Any] = {"path_parameters": params}
        if op.label in SEEDED_BODY:
            kwargs["body"] = SEEDED_BODY[op.label]
            kwargs["media_type"] = "application/json"
        case = op.Case(**kwargs)
        try:
            resp = case.call_and_validate(headers=env.headers("admin"),
                                          excluded_checks=EXCLUDED)
            statuses[op.label] = resp.status_code
        except (Failure, FailureGroup, AssertionError) as exc:
            failures[(op.label, "admin")].append(str(exc))
    assert not failures, _report(failures)
    # the probes reached the rows (not 404s everywhere)
    for label in ("GET /v1/jobs/{job_id}", "GET /v1/checkpoints/{checkpoint_id}",
                  "GET /v1/erasures/{erasure_id}", "GET /v1/jobs/{job_id}/metrics",
                  "GET /v1/references/{snapshot_id}", "GET /v1/lineage/erased",
                  "GET /v1/live"):
        assert statuses[label] == 200, (label, statuses[label])
