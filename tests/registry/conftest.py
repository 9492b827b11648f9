"""Fixtures for the registry tests: real databases (both backends), real model folders.

Each test gets its own model line (``line``), so tests share the session's databases without
seeing each other's checkpoints. Tests that train use ``lab``: a fresh SQLite database of
their own (a job trains on every event in the database) with the toy model as base.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Env, make_env

_lines = itertools.count()


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained toy model + tokenizer folder (a loadable Hugging Face folder)."""
    import torch

    from worker.kto import toy

    torch.set_num_threads(2)
    return toy.make_toy_folder(tmp_path_factory.mktemp("toy") / "model", seed=0)


def _registry_env(backend: str, url: str, root: Path) -> Env:
    return make_env(backend, url, serving_cache_ttl_s=0.0, artifacts_root=str(root),
                    retention_min_age_s=0.0, broker_url="memory://")


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def renv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Env:
    url = request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")
    return _registry_env(request.param, url, tmp_path_factory.mktemp(f"art-{request.param}"))


@pytest.fixture(scope="session")
def pg_renv(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Env:
    return _registry_env("postgres", pg_url, tmp_path_factory.mktemp("art-pg"))


@dataclass
class Reg:
    """One model line on a shared database, with helpers that make checkpoints quickly."""

    env: Env
    line: str
    base: Path
    client: TestClient

    @property
    def engine(self) -> Any:
        return self.env.app.state.engine

    @property
    def settings(self) -> Any:
        return self.env.settings

    def job(self, status: str = "succeeded", final_dir: str | None = "auto",
            adapter_dir: str | None = None, snapshot_id: int | None = None) -> int:
        """A training_jobs row as job_child leaves it (no training): the registry only
        reads the row and the files."""
        from service.job_schemas import JobFilters, JobParams
        from service.models import training_jobs

        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            job_id = conn.execute(training_jobs.insert().values(
                line=self.line, status=status, trigger="api",
                params=JobParams().model_dump(mode="json"), filters=JobFilters().as_json(),
                min_event_id=0, max_event_id=0, n_desirable=1, n_undesirable=1, n_users=1,
                lambda_d=1.0, lambda_u=1.0,
                data={"holdout_fraction": 0.05, "max_events_per_user": 0},
                reference_snapshot_id=snapshot_id, max_attempts=3, created_at=now,
                finished_at=None if status in ("queued", "running") else now,
            ).returning(training_jobs.c.id)).scalar_one()
            if final_dir == "auto":
                final_dir = str(self.fake_model(job_id))
            conn.execute(training_jobs.update().where(training_jobs.c.id == job_id).values(
                output_dir=str(Path(self.settings.artifacts_root) / "jobs" / self.line /
                               str(job_id)),
                result={"final_dir": final_dir, "adapter_dir": adapter_dir,
                        "manifest_sha256": None} if status == "succeeded" else None))
        return job_id

    def fake_model(self, job_id: int, size: int = 4096) -> Path:
        d = Path(self.settings.artifacts_root) / "jobs" / self.line / str(job_id) / "final"
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_bytes(os.urandom(size))
        (d / "config.json").write_text("{}")
        return d

    def candidate(self, **job_kw: Any) -> dict[str, Any]:
        """A checkpoint that passed the gate (decision written as the gate writes it)."""
        from service import registry

        row = registry.ensure_pending(self.engine, self.settings, self.job(**job_kw))
        assert row is not None and row["stage"] == "pending"
        done = registry.record_gate(self.engine, self.settings, row["id"], None, passed=True,
                                    metrics={"checks": []}, reason=None)
        assert done is not None and done["stage"] == "candidate"
        return done

    def get(self, checkpoint_id: int) -> dict[str, Any]:
        from service import registry

        with self.engine.connect() as conn:
            return registry.get_checkpoint(conn, checkpoint_id)

    def events(self, checkpoint_id: int | None = None) -> list[dict[str, Any]]:
        from service import registry

        with self.engine.connect() as conn:
            rows = registry.list_events(conn, line=self.line, checkpoint_id=checkpoint_id,
                                        limit=1000, before_id=None)
        return list(reversed(rows))

    def h(self, scope: str = "admin") -> dict[str, str]:
        return self.env.headers(scope)


def new_line(env: Env, base: Path) -> str:
    from service.lines import put_line

    name = f"t{next(_lines)}-{secrets.token_hex(3)}"
    with env.app.state.engine.begin() as conn:
        put_line(conn, name, str(base))
    return name


@pytest.fixture
def reg(renv: Env, toy_folder: Path) -> Iterator[Reg]:
    with TestClient(renv.app, raise_server_exceptions=False) as c:
        yield Reg(renv, new_line(renv, toy_folder), toy_folder, c)


@pytest.fixture
def pg_reg(pg_renv: Env, toy_folder: Path) -> Iterator[Reg]:
    with TestClient(pg_renv.app, raise_server_exceptions=False) as c:
        yield Reg(pg_renv, new_line(pg_renv, toy_folder), toy_folder, c)


# ---- the lab: a deployment of its own (SQLite, artifacts, the toy task) that really trains

@pytest.fixture(scope="session")
def task_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy model SFT-trained on the arithmetic task to be right only part of the time:
    greedy accuracy near 0, with the right answer holding a good share of probability."""
    import torch

    from worker.kto import toy

    torch.set_num_threads(2)
    tok = toy.make_tokenizer()
    model = toy.make_model(tok, seed=0)
    toy.sft_base_model(model, tok, p_correct=0.4, steps=300, seed=0)
    return toy.save_folder(model, tok, tmp_path_factory.mktemp("task-base") / "model")


class Lab:
    """API, database, artifacts and the in-process equivalents of the worker tasks (the
    Celery path itself is tested in test_worker.py)."""

    LINE = "default"

    def __init__(self, root: Path, base: Path, **overrides: Any) -> None:
        from service import migrate
        from service.schemas import input_models

        url = f"sqlite:///{root / 'lab.db'}"
        defaults: dict[str, Any] = dict(
            artifacts_root=str(root / "artifacts"), base_model=str(base),
            holdout_fraction=0.2, gate_task_evaluator="worker.kto.toy:arithmetic_accuracy",
            gate_task_tolerance=0.05, gate_max_new_tokens=4, gate_n_generate=100,
            serving_cache_ttl_s=0.0, broker_url="memory://", retention_min_age_s=0.0)
        defaults.update(overrides)
        from service.settings import Settings

        migrate.upgrade(Settings(database_url=url))
        self.env = make_env("sqlite", url, **defaults)
        self.settings = self.env.settings
        self.engine = self.env.app.state.engine
        self.client = TestClient(self.env.app, raise_server_exceptions=False)
        self.model = input_models(self.settings)["FeedbackIn"]
        self._n = itertools.count()
        self._answers: dict[str, dict[str, str]] = {}

    # -- data
    def ingest(self, rows: list[dict[str, Any]]) -> None:
        """Rows {prompt, completion, label, model_version, user_id, correction?} through the
        batch API, as frontends send them."""
        events = []
        for r in rows:
            e = {"event_id": f"ev-{next(self._n)}", "prompt": r["prompt"],
                 "completion": r["completion"] or "?", "label": r["label"],
                 "model_version": r["model_version"], "user_id": r["user_id"]}
            if r.get("correction"):
                e["correction"] = r["correction"]
            events.append(e)
        for i in range(0, len(events), 1000):
            resp = self.client.post("/v1/feedback/batch", json={"events": events[i:i + 1000]},
                                    headers=self.env.headers("ingest"))
            assert resp.status_code == 207 and resp.json()["rejected"] == 0, resp.text

    def answers(self, path: str) -> dict[str, str]:
        """Greedy answers of the model at ``path`` to every task prompt (what it serves)."""
        if path not in self._answers:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from worker.kto import toy

            model = AutoModelForCausalLM.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
            prompts = toy.arithmetic_prompts()
            self._answers[path] = dict(zip(prompts, toy.greedy_generate(model, tok, prompts),
                                           strict=True))
        return self._answers[path]

    def accuracy(self, path: str) -> float:
        from worker.kto import toy

        ans = self.answers(path)
        return toy.arithmetic_accuracy(list(ans), list(ans.values()))

    def traffic(self, n: int, rng: Any, *, users: int = 400, invert: bool = False,
                correction_rate: float = 0.5) -> dict[str, list[int]]:
        """``n`` requests: each user asks the serving call (the same Serving.choose the
        route runs) what to serve, gets that model's answer, and votes on it honestly (or,
        ``invert``, through a frontend bug that flips thumbs). Wrong answers sometimes get a
        correction. Returns {version: [ups, n]}."""
        from service import registry
        from service.ingest import hash_user_id
        from worker.kto import toy

        with self.engine.begin() as conn:
            state = registry.serving_state(conn, self.settings, self.LINE)
        rows, seen = [], {}
        prompts = toy.arithmetic_prompts()
        for _ in range(n):
            user = f"user-{rng.randrange(users)}"
            served = state.choose(hash_user_id(user, self.settings.user_id_key))
            p = rng.choice(prompts)
            g = self.answers(served["model_path"])[p]
            ok = toy.arithmetic_accuracy([p], [g]) == 1.0
            row = {"prompt": p, "completion": g, "label": ok != invert,
                   "model_version": served["model_version"], "user_id": user}
            if not ok and not invert and rng.random() < correction_rate:
                row["correction"] = toy.answer(p)
            rows.append(row)
            c = seen.setdefault(served["model_version"], [0, 0])
            c[0] += row["label"]
            c[1] += 1
        self.ingest(rows)
        return seen

    # -- the worker's part, in process
    def train(self, new_data_only: bool = True, filters: dict[str, Any] | None = None, **params: Any) -> int:
        """POST /v1/jobs, then what the train task does: claim, π_ref snapshot, the child."""
        from service import jobs
        from worker.job_child import run
        from worker.references import current_reference

        body = {"line": self.LINE, "params": {"epochs": 2, "max_steps": 40,
                                              "microbatch_size": 8, "learning_rate": 3e-4,
                                              "max_length": 32, **params},
                "filters": {"new_data_only": new_data_only, "corrections": True, **(filters or {})}}
        r = self.client.post("/v1/jobs", json=body, headers=self.env.headers("admin"))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        claim = jobs.claim(self.engine, job_id, "test-host", self.settings)
        assert claim is not None
        snap = current_reference(self.engine, self.settings, self.LINE)
        assert jobs.set_reference(self.engine, claim, snap["id"])
        assert run(job_id, claim.token, self.settings) == 0
        return job_id

    def gate(self, job_id: int, settings: Any = None) -> dict[str, Any]:
        from service import registry
        from worker.gate import run_gate

        run_gate(self.engine, settings or self.settings, job_id, in_process=True)
        with self.engine.connect() as conn:
            return registry.checkpoint_for_job(conn, job_id)

    def settle_snapshots(self) -> None:
        """What the default-queue worker does with the snapshots the registry requested."""
        from sqlalchemy import select

        from service.models import reference_snapshots as rs
        from worker.references import take_snapshot

        with self.engine.connect() as conn:
            pending = conn.execute(select(rs.c.id).where(rs.c.status == "pending")).scalars()
            ids = list(pending)
        for sid in ids:
            take_snapshot(self.engine, self.settings, sid)

    def serving(self) -> dict[str, Any]:
        r = self.client.post("/v1/serve", json={"line": self.LINE},
                             headers=self.env.headers("ingest"))
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        self.client.close()
        self.engine.dispose()


@pytest.fixture
def make_lab(tmp_path: Path, task_base: Path) -> Iterator[Any]:
    labs: list[Lab] = []

    def make(**overrides: Any) -> Lab:
        lab = Lab(tmp_path / f"lab{len(labs)}", task_base, **overrides)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()
