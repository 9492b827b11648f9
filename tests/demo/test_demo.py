"""`prospect demo` in a reduced, seeded form: the whole loop over real processes (API, Celery
worker) on the embedded default, asserting the gain, that production never regressed, and that
every stage left its rows."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, func, select

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from worker.demo.loop import DemoConfig, run_demo

    lines: list[str] = []
    saved = dict(os.environ)
    try:
        result = run_demo(tmp_path_factory.mktemp("demo") / "run",
                          DemoConfig(rounds=3, seed=0, traffic=300, canary_batch=100,
                                     max_canary_requests=900, base_sft_steps=300),
                          keep_running=False, echo=lines.append)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        from service.settings import get_settings

        get_settings.cache_clear()
    return result, lines


def test_demo_improves_production_and_never_regresses(demo):
    result, lines = demo
    assert len(result.rows) == 3
    assert result.never_fell, [r.production_accuracy for r in result.rows]
    assert result.final_accuracy >= result.base_accuracy + 0.2, (
        result.base_accuracy, [r.production_accuracy for r in result.rows])
    # The first round starts from the strong imbalance the balancer must correct.
    first = result.rows[0]
    assert first.n_desirable * 3 < first.n_undesirable and first.lambda_d > 2
    assert any(r.outcome == "promoted" for r in result.rows)
    text = "\n".join(lines)
    assert "| round |" in text and "never fell: yes" in text


def test_every_stage_left_its_rows(demo):
    result, _ = demo
    from service.models import (
        checkpoints,
        feedback_events,
        job_metrics,
        rollout_events,
        training_jobs,
    )

    engine = create_engine(f"sqlite:///{result.workdir}/prospect.db")
    with engine.connect() as conn:
        def count(t, *where):
            return conn.execute(select(func.count()).select_from(t).where(*where)).scalar_one()

        assert count(feedback_events) >= 3 * 300
        assert count(training_jobs, training_jobs.c.status == "succeeded") == sum(
            r.job_status == "succeeded" for r in result.rows) >= 2
        assert count(job_metrics) > 0
        assert count(checkpoints) >= 2
        assert count(checkpoints, checkpoints.c.stage == "production") == 1
        actions = set(conn.execute(select(rollout_events.c.action)).scalars())
    engine.dispose()
    # registered -> gate passed -> canary -> production, for at least one checkpoint.
    assert {"registered", "passed", "canary", "production"} <= actions, actions
