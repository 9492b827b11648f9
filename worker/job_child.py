"""The training process of one job attempt: ``python -m worker.job_child --job-id N --token T``
(or under ``accelerate launch``). Started and watched by worker/job_supervisor.py.

It reads the frozen selection from the job row, trains with worker.kto on the job's π_ref
snapshot, resumes from the newest checkpoint of an earlier attempt (or of the run before a
retry; not one trained on events deleted since: worker/resume_states.py), and writes metrics,
progress and the result through service.jobs, every write fenced by its attempt token.

Exit codes: 0 the row was finished (succeeded or cancelled), 1 an error (the row is failed),
3 interrupted without a cancel, the database unavailable, or the output folder still locked by
an earlier attempt (the row stays running: the supervisor or the reconciler decides), 4 fenced
(a newer attempt owns the job; nothing written).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from service.db import make_engine
from service.jobs import Claim, cancel_requested, finish, get_job, ids_digest, record_progress, selection_for
from service.references import get_snapshot
from service.selection import iter_selected
from service.settings import Settings
from worker import resume_states

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_FENCED = 0, 1, 3, 4
log = logging.getLogger("prospect.job")


class _Fenced(Exception):
    pass


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_config(params: dict[str, Any], lambda_d: float, lambda_u: float, n_examples: int):
    """KTOTrainConfig from the API's JobParams dict."""
    from worker.kto.lm_head import DEFAULT_GRAD_CACHE_GIB
    from worker.kto.trainer import KTOTrainConfig, LoraSettings

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = max(1, params["microbatch_size"] * params["grad_accum_steps"] * world)
    steps = params["max_steps"] or math.ceil(n_examples / per_step) * params["epochs"]
    return KTOTrainConfig(
        beta=params["beta"], lambda_d=lambda_d, lambda_u=lambda_u,
        use_reference_point=params["use_reference_point"],
        learning_rate=params["learning_rate"], lr_scheduler=params["lr_scheduler"],
        warmup_ratio=params["warmup_ratio"], num_epochs=params["epochs"],
        max_steps=params["max_steps"], microbatch_size=params["microbatch_size"],
        grad_accum_steps=params["grad_accum_steps"], max_length=params["max_length"],
        max_prompt_length=params["max_prompt_length"], seed=params["seed"],
        lora=LoraSettings(r=params["lora_r"], alpha=2 * params["lora_r"]) if params["lora"]
        else None,
        gradient_checkpointing=params["gradient_checkpointing"],
        save_every_steps=params["save_every_steps"] or max(1, math.ceil(steps / 20)),
        # .get: jobs queued before these options existed keep their stored params
        cuda_graphs=params.get("cuda_graphs", "auto"), pack_bucket=params.get("pack_bucket", 0),
        lm_head_grad_cache_gib=(DEFAULT_GRAD_CACHE_GIB if params.get("lm_head_grad_cache_gib") is None
                                else params["lm_head_grad_cache_gib"]),
    )


def _lock(out_dir: Path, stop: threading.Event, timeout_s: float) -> Any:
    """Wait until an earlier attempt's process (still saving after its supervisor died) has
    let go of the output folder; the kernel drops the lock when a process dies."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = open(out_dir / ".attempt.lock", "w")  # noqa: SIM115 - held for the process lifetime
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if stop.is_set() or time.monotonic() > deadline:
                raise TimeoutError(f"{out_dir} is still locked by an earlier attempt") from None
            time.sleep(0.2)


def run(job_id: int, token: str, settings: Settings) -> int:
    from worker.kto.trainer import latest_checkpoint, train_kto

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    main = _is_main_process()
    engine = make_engine(settings.model_copy(update={"db_application_name": "prospect-train",
                                                      "db_pool_size": 2}))
    with engine.connect() as conn:
        job = get_job(conn, job_id)
    if job["attempt_token"] != token or job["status"] != "running":
        return EXIT_FENCED
    claim = Claim(job_id, token, job["attempt"])
    out_dir = Path(job["output_dir"])
    try:
        try:
            lock = _lock(out_dir, stop, settings.cancel_grace_s * 2)
        except TimeoutError as exc:
            # An earlier attempt still saving (or a stop while waiting) is no failure of the
            # job: the supervisor or the reconciler decides, within the job's attempts.
            log.warning("job %s: %s", job_id, exc)
            return EXIT_INTERRUPTED
        with engine.connect() as conn:
            snap = get_snapshot(conn, job["reference_snapshot_id"])
            rows = list(iter_selected(conn, selection_for(job, settings),
                                      corrections=job["filters"].get("corrections", False)))
        examples = [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]}
                    for r in rows]
        ids = sorted({r["id"] for r in rows})
        cfg = train_config(job["params"], job["lambda_d"], job["lambda_u"], len(examples))
        data = {**job["data"], "n_examples": len(examples), "event_ids_sha256": ids_digest(ids)}
        resumed = latest_checkpoint(out_dir)
        discarded = (resume_states.trained_on_other_events(resumed, data["event_ids_sha256"])
                     if resumed is not None else None)
        if discarded:
            log.warning("job %s: %s", job_id, discarded)
            if main:
                resume_states.discard(out_dir)
            resumed = None
        if main and not record_progress(engine, claim, [], data=data):
            raise _Fenced

        pending: list[dict[str, Any]] = []
        last_flush = time.monotonic()
        last_cancel_check = time.monotonic()

        def flush(total: int | None) -> None:
            nonlocal last_flush
            try:
                ok = record_progress(engine, claim, pending, total_steps=total)
            except SQLAlchemyError as exc:
                # a database blip must not kill the run: the rows wait for the next flush
                log.warning("job %s: progress not written yet: %s", job_id, exc)
                last_flush = time.monotonic()
                return
            if not ok:
                stop.set()
                raise _Fenced
            pending.clear()
            last_flush = time.monotonic()

        def on_step(m: dict[str, Any]) -> None:
            pending.append({k: v for k, v in m.items() if isinstance(v, (int, float))})
            if time.monotonic() - last_flush >= 1.0 or m["step"] >= m["total_steps"]:
                flush(m["total_steps"])

        def should_stop() -> bool:
            nonlocal last_cancel_check
            if stop.is_set():
                return True
            if main and time.monotonic() - last_cancel_check >= 1.0:
                last_cancel_check = time.monotonic()
                try:
                    if cancel_requested(engine, job_id):
                        stop.set()
                except SQLAlchemyError as exc:  # a blip: ask again at the next check
                    log.warning("job %s: cancel check failed: %s", job_id, exc)
            return stop.is_set()

        res = train_kto(cfg, snap["path"], examples, out_dir, reference=snap["path"],
                        reference_name=f"snapshot:{snap['id']}:{snap['content_hash']}",
                        callback=on_step, should_stop=should_stop, resume=not discarded,
                        extra_manifest={"job_id": job_id, "line": job["line"],
                                        "reference_snapshot_id": snap["id"],
                                        "reference_content_hash": snap["content_hash"],
                                        "data": {"min_event_id": job["min_event_id"],
                                                 "max_event_id": job["max_event_id"],
                                                 "event_ids_sha256": data["event_ids_sha256"]}})
        if not main:
            return EXIT_OK
        for wait in (0.0, 0.5, 2.0, 5.0):  # the last rows have no later flush to wait for
            if not pending:
                break
            time.sleep(wait)
            flush(res.total_steps)
        if pending:
            log.warning("job %s: the metrics of %d step(s) could not be written (database errors)",
                        job_id, len(pending))
        if res.status == "cancelled":
            if cancel_requested(engine, job_id):
                finish(engine, claim, "cancelled", error="cancelled by request",
                       result=_result(res, resumed, discarded))
                return EXIT_OK
            return EXIT_INTERRUPTED
        if not finish(engine, claim, "succeeded", result=_result(res, resumed, discarded)):
            return EXIT_FENCED
        lock.close()
        return EXIT_OK
    except _Fenced:
        return EXIT_FENCED
    except OperationalError as exc:
        # The database went away (a restart, a failover) outside the per-tick calls that ride
        # it out: no fault of the job, whose row could not be written now anyway. Interrupted:
        # the reconciler re-queues it within PROSPECT_JOB_MAX_ATTEMPTS, resuming its checkpoint.
        log.warning("job %s: database unavailable: %s", job_id, exc)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - the row carries the reason
        err = traceback.format_exc()
        log.error("job %s failed:\n%s", job_id, err)
        if main:
            finish(engine, claim, "failed", error=err)
        return EXIT_ERROR
    finally:
        engine.dispose()


def _result(res: Any, resumed: Path | None, discarded: str | None = None) -> dict[str, Any]:
    manifest = res.final_dir / "manifest.json" if res.final_dir else None
    return {
        "status": res.status, "steps": res.step, "total_steps": res.total_steps,
        "examples_seen": res.examples_seen,
        "final_dir": str(res.final_dir) if res.final_dir else None,
        "adapter_dir": str(res.adapter_dir) if res.adapter_dir else None,
        "last_checkpoint": str(res.last_checkpoint) if res.last_checkpoint else None,
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()
        if manifest and manifest.exists() else None,
        "resumed_from": str(resumed) if resumed else None,
        "resumed_from_step": int(resumed.name.split("-")[-1]) if resumed else 0,
        #: why the resume states found were not resumed (events deleted since), or None
        "resume_discarded": discarded,
        "data_stats": res.data_stats,
        "final_metrics": res.history[-1] if res.history else None,
        "host": socket.gethostname(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job-id", type=int, required=True)
    ap.add_argument("--token", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run(args.job_id, args.token, Settings())


if __name__ == "__main__":
    sys.exit(main())
