"""`prospect demo`: the whole product loop on a laptop, seeded, in a few minutes on 2 cores.

1. Build a base model: a tiny model made locally, SFT'd on a checkable task (single-digit
   addition) so it is right only part of the time.
2. Start the real API and a real Celery worker on the embedded default (SQLite, a broker in a
   SQLite file, CPU).
3. Each round: simulated users ask `/v1/serve` which version to use, get sampled answers and
   post thumbs through the HTTP API (about 1 desirable : 5 undesirable at first); the
   retraining check (the task beat runs) queues a KTO job with λD/λU from the balancer; the
   worker trains from the production model as π_ref; the gate scores the checkpoint on the
   held-out thumbs and the task; a candidate goes to canary on half the users; the live guard
   (always-valid test) promotes it or rolls it back from the users' thumbs.
4. Production's task accuracy is measured after every round: the gate and the canary exist so
   that it never falls.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
from tqdm.auto import tqdm

from worker.demo.runtime import Runtime, embedded_settings, settings_env, start
from worker.demo.simulate import Models, Traffic, World


@dataclass
class DemoConfig:
    rounds: int = 3
    seed: int = 0
    #: Requests served (and thumbs posted) before each round's retraining check.
    traffic: int = 400
    #: Canary traffic per guard check, and the most canary-phase requests per round.
    canary_batch: int = 100
    max_canary_requests: int = 1200
    n_users: int = 60
    label_noise: float = 0.05
    #: The base model's SFT: right answers in this share of its training targets.
    base_p_correct: float = 0.25
    base_sft_steps: int = 300
    canary_percent: float = 50.0


@dataclass
class RoundRow:
    round: int
    events: int
    n_desirable: int | None = None
    n_undesirable: int | None = None
    lambda_d: float | None = None
    lambda_u: float | None = None
    job_id: int | None = None
    job_status: str | None = None
    gate: str | None = None
    gate_reason: str | None = None
    canary_rate: float | None = None
    production_rate: float | None = None
    canary_requests: int = 0
    outcome: str = ""
    production_version: str = ""
    production_accuracy: float = 0.0
    seconds: float = 0.0


@dataclass
class DemoResult:
    base_accuracy: float
    rows: list[RoundRow] = field(default_factory=list)
    dashboard_url: str = ""
    workdir: str = ""

    @property
    def final_accuracy(self) -> float:
        return self.rows[-1].production_accuracy if self.rows else self.base_accuracy

    @property
    def never_fell(self) -> bool:
        accs = [self.base_accuracy] + [r.production_accuracy for r in self.rows]
        return all(b >= a - 1e-9 for a, b in zip(accs, accs[1:]))


def demo_settings(workdir: Path, cfg: DemoConfig, base_dir: Path) -> Any:
    """The embedded default, tuned for a few minutes on a CPU; only URLs differ from production."""
    return embedded_settings(
        workdir,
        base_model=str(base_dir),
        holdout_fraction=0.1,
        max_events_per_user=0,
        retrain_min_events=int(cfg.traffic * 0.8),
        min_per_class=5,
        default_job_params={"learning_rate": 3e-4, "epochs": 2, "microbatch_size": 8,
                            "max_length": 32, "beta": 0.1, "warmup_ratio": 0.1,
                            "seed": cfg.seed},
        gate_task_evaluator="worker.kto.toy:arithmetic_accuracy",
        gate_n_generate=100, gate_max_new_tokens=4, gate_min_holdout_examples=10,
        auto_canary_percent=cfg.canary_percent,
        guard_min_samples=100, guard_noninferiority_margin=0.05,
        guard_max_samples=cfg.max_canary_requests,
        serving_cache_ttl_s=0.0,
        heartbeat_interval_s=2.0,
        retrain_failure_backoff_s=0.0,  # rounds a minute apart: a failed job is retried next round
    )


def build_base(path: Path, cfg: DemoConfig) -> float:
    from worker.kto import toy

    tok = toy.make_tokenizer()
    model = toy.make_model(tok, seed=cfg.seed)
    toy.sft_base_model(model, tok, p_correct=cfg.base_p_correct, steps=cfg.base_sft_steps,
                       seed=cfg.seed)
    toy.save_folder(model, tok, path)
    return toy.task_accuracy(model, tok)


def _poll(fetch: Callable[[], Any], timeout: float, what: str, rt: Runtime,
          every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rt.check_alive()
        value = fetch()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _wait_job(rt: Runtime, api: httpx.Client, job_id: int, label: str) -> dict[str, Any]:
    bar = tqdm(total=1, desc=f"{label} KTO job {job_id}", unit="step", leave=False)
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline:
            rt.check_alive()
            job = api.get(f"/v1/jobs/{job_id}").json()
            if job["total_steps"]:
                bar.total = job["total_steps"]
                bar.n = job["step"]
                bar.refresh()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.3)
    finally:
        bar.close()
    raise TimeoutError(f"job {job_id} did not finish")


def _checkpoint_of(api: httpx.Client, job_id: int) -> dict[str, Any] | None:
    for ck in api.get("/v1/checkpoints", params={"limit": 20}).json()["checkpoints"]:
        if ck["job_id"] == job_id and ck["stage"] != "pending":
            return ck
    return None


def _checkpoint(api: httpx.Client, checkpoint_id: int) -> dict[str, Any]:
    return api.get(f"/v1/checkpoints/{checkpoint_id}").json()


def _merge(a: Traffic, b: Traffic) -> Traffic:
    for key, t in b.by_arm.items():
        a.by_arm[key].n += t.n
        a.by_arm[key].up += t.up
    a.events += b.events
    return a


#: Written into every demo folder: only such a folder (or an empty one) is emptied on a rerun.
WORKDIR_MARKER = ".prospect-demo"


class WorkdirNotDemo(ValueError):
    """The folder holds something other than an earlier demo: deleting it could lose work."""


def _clear_workdir(workdir: Path) -> None:
    """Empty the folder of an earlier demo; refuse anything else (``--workdir .`` or ``~``)."""
    if not workdir.exists():
        return
    if not workdir.is_dir():
        raise WorkdirNotDemo(f"{workdir} is a file, not a folder")
    older_demo = all((workdir / name).exists() for name in ("base-model", "prospect.db", "broker.db"))
    ours = (workdir / WORKDIR_MARKER).is_file() or older_demo
    if not ours and any(workdir.iterdir()):
        raise WorkdirNotDemo(f"{workdir} is not empty and not a demo folder; refusing to delete it "
                             "(give a new or empty folder)")
    import shutil

    shutil.rmtree(workdir)


def run_demo(workdir: str | Path | None = None, cfg: DemoConfig | None = None,
             keep_running: bool = False, echo: Callable[[str], None] = print) -> DemoResult:
    cfg = cfg or DemoConfig()
    workdir = Path(workdir or "./var/demo").resolve()
    _clear_workdir(workdir)
    workdir.mkdir(parents=True)
    (workdir / WORKDIR_MARKER).touch()
    t0 = time.monotonic()
    echo(f"Prospect demo in {workdir} (seed {cfg.seed}): SQLite, a broker in a SQLite file, "
         "a real worker process, CPU, a tiny model made here.")
    echo(f"Building the base model (supervised on single-digit addition, "
         f"{cfg.base_sft_steps} steps, right in {cfg.base_p_correct:.0%} of its targets)...")
    base_dir = workdir / "base-model"
    base_acc = build_base(base_dir, cfg)
    echo(f"  base model greedy accuracy: {base_acc:.2f}")

    settings = demo_settings(workdir, cfg, base_dir)
    # The checks beat would run are called in this process, on the same code path.
    os.environ.update(settings_env(settings))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from service.settings import get_settings

    get_settings.cache_clear()
    from worker import tasks

    rt = start(workdir, settings)
    result = DemoResult(base_accuracy=base_acc, workdir=str(workdir),
                        dashboard_url=f"{rt.base_url}/dashboard")
    echo(f"API {rt.base_url} (dashboard: {result.dashboard_url}, read key: {rt.keys['read']})")
    from worker.kto import toy

    models = Models(toy.make_tokenizer())
    world = World(models, n_users=cfg.n_users, noise=cfg.label_noise, seed=cfg.seed)
    api, ingest = rt.client("admin"), rt.client("ingest")
    try:
        for r in range(1, cfg.rounds + 1):
            row = _round(r, cfg, rt, api, ingest, world, models, tasks)
            result.rows.append(row)
            echo(_format_row(row))
    finally:
        if not (keep_running and sys.stdin.isatty()):
            rt.close()
    echo("")
    echo(format_table(result))
    echo(f"Production accuracy {base_acc:.2f} -> {result.final_accuracy:.2f}; "
         f"never fell: {'yes' if result.never_fell else 'NO'}; "
         f"{time.monotonic() - t0:.0f}s.")
    if keep_running and sys.stdin.isatty():
        echo(f"The API stays up: {result.dashboard_url} (read key above). Press Enter to stop.")
        try:
            input()
        finally:
            rt.close()
    return result


def _round(r: int, cfg: DemoConfig, rt: Runtime, api: httpx.Client, ingest: httpx.Client,
           world: World, models: Models, tasks: Any) -> RoundRow:
    t = time.monotonic()
    traffic = world.traffic(ingest, cfg.traffic, tag=f"r{r}")
    row = RoundRow(round=r, events=traffic.events)
    report = tasks.check_retraining()
    if "default" in report["failed"]:
        row.outcome = f"no job: the retraining check failed: {report['failed']['default']}"
        return _finish(row, api, models, t)
    decision = report["lines"]["default"]
    if decision["job_id"] is None:
        row.outcome = f"no job: {decision['reason']}"
        return _finish(row, api, models, t)
    job = _wait_job(rt, api, decision["job_id"], f"round {r}")
    row.job_id, row.job_status = job["id"], job["status"]
    row.n_desirable, row.n_undesirable = job["n_desirable"], job["n_undesirable"]
    row.lambda_d, row.lambda_u = job["lambda_d"], job["lambda_u"]
    if job["status"] != "succeeded":
        row.outcome = f"job {job['status']}: {(job['error'] or '')[-200:]}"
        return _finish(row, api, models, t)
    ck = _poll(lambda: _checkpoint_of(api, job["id"]), 600, "the evaluation gate", rt)
    row.gate = "rejected" if ck["stage"] == "rejected" else "passed"
    row.gate_reason = ck["reason"]
    if ck["stage"] == "rejected":
        row.outcome = "rejected by the gate"
        return _finish(row, api, models, t)
    if ck["stage"] == "candidate":
        api.post(f"/v1/checkpoints/{ck['id']}/promote",
                 json={"stage": "canary", "percent": cfg.canary_percent,
                       "reason": "demo"}).raise_for_status()
    canary = Traffic()
    while True:
        _merge(canary, world.traffic(ingest, cfg.canary_batch, tag=f"r{r}c"))
        tasks.canary_guard()
        stage = _checkpoint(api, ck["id"])["stage"]
        if stage != "canary":
            row.outcome = "promoted" if stage == "production" else "rolled back"
            break
        if canary.events >= cfg.max_canary_requests:
            api.post("/v1/rollback", json={"target": "canary",
                                           "reason": "demo: inconclusive, keep production"}
                     ).raise_for_status()
            row.outcome = "inconclusive: kept production"
            break
    row.canary_requests = canary.events
    row.canary_rate = canary.by_arm["canary"].rate
    row.production_rate = (canary.by_arm["production"].rate
                           if canary.by_arm["production"].n else canary.by_arm["base"].rate)
    return _finish(row, api, models, t)


def _finish(row: RoundRow, api: httpx.Client, models: Models, t: float) -> RoundRow:
    serve = api.post("/v1/serve", json={}).json()
    row.production_version = serve["model_version"]
    row.production_accuracy = models.accuracy(serve["model_path"])
    row.seconds = time.monotonic() - t
    return row


_HEAD = ("round", "events", "nD:nU", "λD/λU", "gate", "thumbs-up canary vs prod", "outcome",
         "production", "accuracy")


def _cells(row: RoundRow) -> tuple[str, ...]:
    pct = (lambda v: "-" if v is None else f"{v:.0%}")
    return (
        str(row.round), str(row.events),
        "-" if row.n_desirable is None else f"{row.n_desirable}:{row.n_undesirable}",
        "-" if row.lambda_d is None else f"{row.lambda_d:.2f}/{row.lambda_u:.2f}",
        row.gate or "-",
        "-" if row.canary_rate is None else f"{pct(row.canary_rate)} vs "
                                            f"{pct(row.production_rate)} (n={row.canary_requests})",
        row.outcome, row.production_version, f"{row.production_accuracy:.2f}",
    )


def _format_row(row: RoundRow) -> str:
    cells = _cells(row)
    return f"round {cells[0]}: " + " | ".join(f"{h} {c}" for h, c in zip(_HEAD[1:], cells[1:]))


def format_table(result: DemoResult) -> str:
    rows = [_HEAD] + [_cells(r) for r in result.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEAD))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows[1:]]
    return "\n".join(out)


def as_dict(result: DemoResult) -> dict[str, Any]:
    return {"base_accuracy": result.base_accuracy, "rows": [asdict(r) for r in result.rows],
            "never_fell": result.never_fell}
