"""Two CPU processes (gloo): z0 is averaged across processes before the clamp, one-class
microbatches take part in the same collectives (no hang, no NaN), the metrics are summed across
processes, and a 2-process run equals a 1-process run with the same microbatches."""

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from worker.kto import toy

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(**kw):
    from worker.kto.trainer import KTOTrainConfig

    base = dict(beta=0.1, learning_rate=3e-3, microbatch_size=4, num_epochs=1, max_length=32, seed=1,
                lr_scheduler="constant", use_reference_point=False)
    base.update(kw)
    return KTOTrainConfig(**base)


def _worker(rank: int, world: int, port: int, tmp: str, model_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from worker.kto.loss import kto_loss, metrics_from_sums
    from worker.kto.loss import all_reduce_sum
    from worker.kto.trainer import train_kto

    acc = Accelerator(cpu=True)
    assert acc.num_processes == world and torch.distributed.get_backend() == "gloo"
    out = {}
    # --- the loss: rank 0 holds only desirable examples (mean KL -1), rank 1 only undesirable (mean KL +3)
    if rank == 0:
        args = ([-1.0, -2.0], [-1.5, -2.5], [True, True], [-2.0, -3.0], [-1.0, -2.0])
    else:
        args = ([-4.0, -1.0, -3.0], [-3.0, -1.0, -2.0], [False, False, False], [-1.0, -1.0, -1.0], [-4.0, -4.0, -4.0])
    t = [torch.tensor(a) for a in args]
    o = kto_loss(*t, beta=0.5)
    out["z0"] = o.z0.item()
    out["kl_local"] = o.kl_local.item()
    out["loss"] = o.loss.item()
    out["metrics"] = metrics_from_sums(all_reduce_sum(o.stat_sums))

    # --- the trainer: same data, 2 processes x 1 microbatch per step
    rows = toy.make_feedback(32, desirable_fraction=0.4, seed=8)
    history = []
    res = train_kto(_cfg(), model_dir, rows, os.path.join(tmp, "dist"), callback=history.append, accelerator=acc)
    out["history"] = history
    torch.save({k: v.clone() for k, v in res.model.state_dict().items()}, os.path.join(tmp, f"params{rank}.pt"))
    # --- and with the reference point on: every rank logs the same (cross-process) z0
    h2 = []
    res2 = train_kto(_cfg(use_reference_point=True, max_steps=3), model_dir, rows, os.path.join(tmp, "dist2"),
                     accelerator=acc)
    out["kl2"] = [h["kl"] for h in res2.history]
    # --- the packed path under DDP (its forward takes a dict of tensors and ints): same z0 and losses
    res3 = train_kto(_cfg(use_reference_point=True, max_steps=3, packing=True), model_dir, rows,
                     os.path.join(tmp, "dist3"), accelerator=acc)
    out["kl3"] = [h["kl"] for h in res3.history]
    out["loss2"] = [h["loss"] for h in res2.history]
    out["loss3"] = [h["loss"] for h in res3.history]
    with open(os.path.join(tmp, f"out{rank}.json"), "w") as fh:
        json.dump(out, fh)
    torch.distributed.barrier()


def test_two_process_gloo(toy_dir, tmp_path):
    port = _free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path), str(toy_dir)), nprocs=2, join=True)
    o0, o1 = (json.loads((tmp_path / f"out{r}.json").read_text()) for r in (0, 1))

    # z0 = clamp(mean over processes of each process's mean KL): mean(-1, +3) = 1, on both ranks
    assert o0["kl_local"] == pytest.approx(-1.0) and o1["kl_local"] == pytest.approx(3.0)
    assert o0["z0"] == pytest.approx(1.0) and o1["z0"] == pytest.approx(1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))
    want0 = sum(1 - sig(0.5 * (r - 1.0)) for r in (0.5, 0.5)) / 2  # desirable, r = 0.5
    want1 = sum(1 - sig(0.5 * (1.0 - r)) for r in (-1.0, 0.0, -1.0)) / 3  # undesirable
    assert o0["loss"] == pytest.approx(want0, rel=1e-6) and o1["loss"] == pytest.approx(want1, rel=1e-6)
    # metrics summed across processes: each rank alone has one class, together both
    for o in (o0, o1):
        assert o["metrics"]["rewards/chosen"] == pytest.approx(0.25)
        assert o["metrics"]["rewards/rejected"] == pytest.approx(0.5 * (-2.0 / 3))
        assert o["metrics"]["rewards/margins"] == pytest.approx(0.25 + 1 / 3)

    # both ranks hold the same parameters, equal to a 1-process run with grad_accum=2 (same microbatches)
    p0, p1 = torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt")
    from worker.kto.trainer import train_kto

    single = train_kto(_cfg(grad_accum_steps=2), toy_dir, toy.make_feedback(32, desirable_fraction=0.4, seed=8),
                       tmp_path / "single")
    ps = single.model.state_dict()
    for k in p0:
        torch.testing.assert_close(p0[k], p1[k], rtol=0, atol=0)
        torch.testing.assert_close(p0[k], ps[k], rtol=1e-5, atol=1e-6)
    h_dist = o0["history"]
    assert len(h_dist) == len(single.history) == 4
    for a, b in zip(h_dist, single.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["rewards/chosen"] == pytest.approx(b["rewards/chosen"], rel=1e-5)
        assert a["examples_seen"] == b["examples_seen"]
    assert o1["history"] == []  # only the main process reports
    assert o0["kl2"] == o1["kl2"] and len(o0["kl2"]) == 3
    assert o0["kl3"] == o1["kl3"] and o0["kl3"] == pytest.approx(o0["kl2"], rel=1e-4, abs=1e-6)
    assert o0["loss3"] == pytest.approx(o0["loss2"], rel=1e-5)
