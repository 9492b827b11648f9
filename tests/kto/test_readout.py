"""Metrics read back a step late (worker.kto.readout): on CUDA the host issues step k+1 before it
reads step k's loss, so the device never waits for the host between steps. On the CPU the lag is
0 by default; these tests force it to 1 there and hold the lagged trainer to the prompt one."""

from __future__ import annotations

import functools
import json
import threading

import pytest
import torch

from worker.kto import readout as readout_mod
from worker.kto import toy
from worker.kto import trainer as trainer_mod
from worker.kto.readout import StepReadout
from worker.kto.trainer import KTOTrainConfig, latest_checkpoint, train_kto


def test_values_come_back_in_order_after_the_lag():
    r = StepReadout("cpu", n_values=3, lag=2)
    out = []
    for step in range(1, 6):
        r.submit([torch.tensor(float(step)), torch.tensor([step * 10.0, step * 100.0])], {"step": step})
        out += list(r.ready())
        assert len(r) == min(step, 2)  # never more than the lag in flight after ready()
    assert [m["step"] for _, m in out] == [1, 2, 3]
    out += list(r.drain())
    assert [(v, m["step"]) for v, m in out] == [([s, s * 10.0, s * 100.0], s) for s in range(1, 6)]
    assert all("device_step_s" not in m for _, m in out)  # device time only where there is a device
    with pytest.raises(ValueError, match="expected 3 values"):
        r.submit([torch.tensor(1.0)], {})


def test_cpu_reads_at_once_by_default():
    r = StepReadout("cpu", n_values=1)
    r.submit([torch.tensor(2.5)], {"step": 1})
    assert [v for v, _ in r.ready()] == [[2.5]]


def _cfg(**kw):
    base = dict(beta=0.1, learning_rate=3e-3, microbatch_size=4, grad_accum_steps=1, num_epochs=1,
                warmup_steps=1, lr_scheduler="cosine", max_grad_norm=1.0, seed=3, max_length=32)
    base.update(kw)
    return KTOTrainConfig(**base)


@pytest.fixture
def lagged(monkeypatch):
    monkeypatch.setattr(trainer_mod, "StepReadout", functools.partial(readout_mod.StepReadout, lag=1))


def _same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    def timeless(m: dict) -> dict:
        return {k: v for k, v in m.items() if k != "tokens_per_s"}

    for x, y in zip(a, b):
        assert timeless(x) == timeless(y)


def test_a_lagged_run_equals_a_prompt_one(toy_dir, tmp_path, monkeypatch):
    rows = toy.make_feedback(40, desirable_fraction=0.3, seed=1)  # 10 steps
    prompt_seen: list[dict] = []
    prompt = train_kto(_cfg(save_every_steps=4), toy_dir, rows, tmp_path / "prompt", callback=prompt_seen.append)
    monkeypatch.setattr(trainer_mod, "StepReadout", functools.partial(readout_mod.StepReadout, lag=1))
    lagged_seen: list[dict] = []
    lag = train_kto(_cfg(save_every_steps=4), toy_dir, rows, tmp_path / "lagged", callback=lagged_seen.append)
    assert lag.status == prompt.status == "completed" and lag.step == prompt.step == 10
    _same_metrics(lagged_seen, prompt_seen)
    _same_metrics(lag.history, prompt.history)
    assert lag.examples_seen == prompt.examples_seen == 40
    for k, v in prompt.model.state_dict().items():
        torch.testing.assert_close(lag.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # checkpoints at the same steps, with the metrics of their own step
    names = sorted(p.name for p in (tmp_path / "lagged" / "checkpoints").glob("step-*"))
    assert names == sorted(p.name for p in (tmp_path / "prompt" / "checkpoints").glob("step-*"))
    assert latest_checkpoint(tmp_path / "lagged").name == "step-00000008"
    for name in names:  # each holds its own step's count and metrics, as the prompt run's do
        a, b = (json.loads((tmp_path / run / "checkpoints" / name / "manifest.json").read_text())
                for run in ("lagged", "prompt"))
        assert a["examples_seen"] == b["examples_seen"] == int(name.split("-")[1]) * 4
        assert a["metrics"]["step"] == a["step"] and a["metrics"]["loss"] == b["metrics"]["loss"]


def test_a_lagged_cancel_stops_within_one_more_step_and_resumes_to_the_same_model(toy_dir, tmp_path, lagged):
    rows = toy.make_feedback(40, desirable_fraction=0.3, seed=1)
    full = train_kto(_cfg(), toy_dir, rows, tmp_path / "full")
    stop = threading.Event()

    def cb(m):
        if m["step"] == 4:
            stop.set()

    part = train_kto(_cfg(save_every_steps=3), toy_dir, rows, tmp_path / "resumed", callback=cb, should_stop=stop)
    assert part.status == "cancelled" and part.step == 5  # step 4's metrics arrive after step 5 was issued
    assert latest_checkpoint(tmp_path / "resumed").name == f"step-{part.step:08d}"  # saved on cancel
    assert part.history[-1]["step"] == part.step and part.examples_seen == part.step * 4
    rest = train_kto(_cfg(save_every_steps=3), toy_dir, rows, tmp_path / "resumed")
    assert rest.status == "completed" and rest.step == 10
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(rest.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
