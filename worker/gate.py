"""The evaluation gate: score a succeeded job's model on held-out feedback before anyone can
promote it.

``run_gate(job_id)`` is what the Celery task ``prospect.evaluate_job`` (gpu queue) does:
register the job's model as a ``pending`` checkpoint, claim its evaluation (a fenced token,
like a job attempt), and run the evaluation as a child process
(``python -m worker.gate --checkpoint-id N --token T``) so its exit frees all GPU memory, as
training does. The child loads the checkpoint and the job's π_ref snapshot, runs
``worker.kto.evaluate.evaluate_policy`` on the held-out events (the split no job trains on),
applies ``service.gate_policy`` and writes ``candidate`` or ``rejected`` with the reason.

An evaluation that crashes, or runs past ``PROSPECT_GATE_MAX_RUNTIME_S`` (a hang keeps its
supervisor heartbeating, so nothing else would stop it), is retried
(``PROSPECT_GATE_MAX_ATTEMPTS``), then the checkpoint is rejected as unevaluable; one whose
worker vanished is found by the gate sweep (beat). A checkpoint a person rejects meanwhile
(``POST /v1/checkpoints/{id}/reject``) is seen by the supervisor within ``STOP_POLL_S`` and
its child stopped, freeing the GPU; the verdict of a child that still gets that far is fenced
out by ``registry.record_gate``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from service import registry
from service.db import make_engine
from service.gate_policy import Check, Thresholds, check_holdout, check_integrity, decide
from service.jobs import get_job
from service.references import get_snapshot
from service.settings import Settings

log = logging.getLogger("prospect.gate")
EXIT_DECIDED, EXIT_ERROR, EXIT_FENCED = 0, 1, 4
#: How often the supervisor reads the checkpoint's stage: the evaluation child cannot poll a
#: stop itself (it is inside a forward pass), and a rejected one should free its GPU promptly.
STOP_POLL_S = 2.0


def _integrity(row: dict[str, Any]) -> Check:
    from worker.kto.trainer import verify_manifest

    path = row["artifact_path"]
    if not path or not Path(path).is_dir():
        return check_integrity(False, f"model folder {path} is missing")
    if not verify_manifest(path):
        return check_integrity(False, f"{path} does not match its manifest.json")
    if row["manifest_sha256"]:
        got = hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()
        if got != row["manifest_sha256"]:
            return check_integrity(False, f"{path}/manifest.json is not the one the job wrote")
    if row["adapter_path"] and not verify_manifest(row["adapter_path"]):
        return check_integrity(False, f"{row['adapter_path']} does not match its manifest")
    return check_integrity(True, "")


def evaluate(engine: Engine, settings: Settings, checkpoint_id: int, token: str | None
             ) -> dict[str, Any] | None:
    """Evaluate one pending checkpoint and record the decision; None when fenced (another
    attempt or a person decided meanwhile)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.kto.evaluate import evaluate_policy

    thresholds = Thresholds.from_settings(settings)
    with engine.connect() as conn:
        row = registry.get_checkpoint(conn, checkpoint_id)
        if row["stage"] != "pending" or (token is not None and row["gate_token"] != token):
            return None  # rejected (or taken over) before this child started
        job = get_job(conn, row["job_id"])
        snap = get_snapshot(conn, job["reference_snapshot_id"])
        examples = registry.holdout_examples(conn, settings, job)
    pre = [_integrity(row), check_holdout(len(examples), thresholds)]
    facts: dict[str, Any] = {"holdout": {"n_examples": len(examples),
                                         "scope": settings.gate_holdout_scope},
                             "reference_snapshot_id": snap["id"],
                             "host": socket.gethostname()}
    report = None
    if all(c.passed for c in pre):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tok = AutoTokenizer.from_pretrained(row["artifact_path"])
        policy = AutoModelForCausalLM.from_pretrained(row["artifact_path"], dtype="auto").to(device)
        ref = AutoModelForCausalLM.from_pretrained(snap["path"], dtype="auto").to(device)
        params = job["params"]
        rep = evaluate_policy(
            policy, ref, tok, examples, beta=float(params.get("beta", 0.1)),
            max_length=params.get("max_length"), max_prompt_length=params.get("max_prompt_length"),
            batch_size=settings.gate_batch_size,
            n_generate=settings.gate_n_generate, max_new_tokens=settings.gate_max_new_tokens,
            task_evaluator=settings.gate_task_evaluator, seed=int(params.get("seed", 0)))
        report = rep.as_dict()
        facts["device"] = device
        del policy, ref
    decision = decide(report, thresholds, pre)
    metrics = {"eval": report, **decision.as_dict(), **facts}
    return registry.record_gate(engine, settings, checkpoint_id, token, passed=decision.passed,
                                metrics=metrics, reason=decision.reason)


#: Optional registry settings: None must reach the child as "none", not as the default.
NULLABLE = ("gate_task_evaluator", "gate_task_tolerance", "gate_min_margin", "gate_max_kl",
            "gate_max_length_drift", "guard_max_samples", "webhook_url", "webhook_secret")


def child_env(settings: Settings) -> dict[str, str]:
    """PROSPECT_* variables that rebuild ``settings`` in a child process, disabled
    thresholds included (worker.job_supervisor.settings_env leaves None values out)."""
    from worker.job_supervisor import settings_env

    env = settings_env(settings)
    for name in NULLABLE:
        if getattr(settings, name) is None:
            env[f"PROSPECT_{name.upper()}"] = "none"
    return env


def _log_tail(path: Path, limit: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def child_argv(checkpoint_id: int, token: str) -> list[str]:
    return [sys.executable, "-m", "worker.gate", "--checkpoint-id", str(checkpoint_id),
            "--token", token]


def timeout_error(settings: Settings, log_path: Path) -> str:
    """A timed-out evaluation is a failed attempt (retried, then rejected after
    gate_max_attempts). The reason comes last: the rejection keeps only the error's end."""
    return (f"log tail:\n{_log_tail(log_path)}\nevaluation stopped: it ran longer than "
            f"PROSPECT_GATE_MAX_RUNTIME_S={settings.gate_max_runtime_s:g}s")


def run_gate(engine: Engine, settings: Settings, job_id: int, in_process: bool = False) -> str:
    """One evaluation attempt for a succeeded job; returns what happened, for the log."""
    from worker.supervisor import run_supervised

    row = registry.ensure_pending(engine, settings, job_id)
    if row is None:
        return "not_succeeded"
    if row["stage"] != "pending":
        return row["stage"]
    token = registry.claim_gate(engine, settings, row["id"])
    if token is None:
        done = registry.reject_exhausted(engine, settings, row["id"])
        return done["stage"] if done else "skipped"
    if in_process:
        try:
            done = evaluate(engine, settings, row["id"], token)
        except Exception:
            registry.release_gate(engine, settings, row["id"], token, traceback.format_exc())
            raise
        return done["stage"] if done else "fenced"
    with engine.connect() as conn:
        job = get_job(conn, job_id)
        attempt = registry.get_checkpoint(conn, row["id"])["gate_attempts"]
    logs = Path(job["output_dir"] or settings.artifacts_root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"gate-{attempt}.log"

    def beat() -> bool:
        try:
            return registry.gate_heartbeat(engine, row["id"], token)
        except sa_exc.SQLAlchemyError as exc:  # a database blip must not kill the evaluation
            log.warning("checkpoint %s: gate heartbeat failed: %s", row["id"], exc)
            return True

    def stop() -> bool:
        try:
            return registry.gate_should_stop(engine, row["id"], token)
        except sa_exc.SQLAlchemyError as exc:  # as the heartbeat: a blip is not a stop
            log.warning("checkpoint %s: stage check failed: %s", row["id"], exc)
            return False

    try:
        outcome = run_supervised(
            child_argv(row["id"], token),
            heartbeat=beat,
            should_cancel=stop, heartbeat_interval_s=settings.heartbeat_interval_s,
            cancel_poll_interval_s=min(STOP_POLL_S, settings.heartbeat_interval_s),
            grace_s=settings.cancel_grace_s,
            env={**os.environ, **child_env(settings), "PYTHONUNBUFFERED": "1"},
            log_path=log_path, max_runtime_s=settings.gate_max_runtime_s or None)
    except Exception as exc:
        registry.release_gate(engine, settings, row["id"], token, f"{type(exc).__name__}: {exc}")
        raise
    with engine.connect() as conn:
        now = registry.get_checkpoint(conn, row["id"])
    if outcome.cancelled or outcome.fenced:
        log.info("checkpoint %s: evaluation stopped after %.1fs: the checkpoint is %s",
                 row["id"], outcome.seconds, now["stage"])
    if now["stage"] == "pending" and now["gate_token"] == token:
        error = (timeout_error(settings, log_path) if outcome.timed_out else
                 f"evaluation exited with code {outcome.returncode}; log tail:\n"
                 f"{_log_tail(log_path)}")
        now = registry.release_gate(engine, settings, row["id"], token, error)
    return str(now["stage"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate one pending checkpoint (the gate).")
    ap.add_argument("--checkpoint-id", type=int, required=True)
    ap.add_argument("--token", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    engine = make_engine(settings.model_copy(update={"db_application_name": "prospect-gate",
                                                      "db_pool_size": 2}))
    try:
        done = evaluate(engine, settings, args.checkpoint_id, args.token)
    except Exception:  # noqa: BLE001 - the parent records the log tail
        log.error("evaluation of checkpoint %s failed:\n%s", args.checkpoint_id,
                  traceback.format_exc())
        return EXIT_ERROR
    finally:
        engine.dispose()
    if done is None:
        return EXIT_FENCED
    log.info("checkpoint %s: %s %s", args.checkpoint_id, done["stage"], done["reason"] or "")
    return EXIT_DECIDED


if __name__ == "__main__":
    sys.exit(main())
