"""Where one KTO training step of Prospect's packed path spends its device time (issue 4).

torch.profiler recorded nothing on the H100 machines this project borrows, so this times the
step's phases with CUDA events instead, replaying the trainer's step with its own pieces on the
throughput benchmark's model and rows (bench/train_throughput.py): host packing, the policy +
KL forward (``packed_sequence_logps``), loss and backward, gradient clipping + fused AdamW.
Then, apart, the LM head alone (forward + backward on as many rows as the step scores, for each
``lm_head`` implementation) and the backbone alone (packed forward + backward, no LM head), so
that the step's time splits into backbone, LM head and the rest. Prints a table; ``--json-out``
keeps it.

  python bench/step_phases.py --size 0.5b --config varlen-b32      # on a GPU
  python bench/step_phases.py --size tiny --device cpu             # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import train_throughput as tt  # noqa: E402


class Timer:
    """Device time of a region (CUDA events on a GPU, no sync inside the step; wall clock on CPU)
    and, beside it, the host's time issuing the region's work. On a GPU the host runs ahead of the
    device; where a region's host time comes near its device time, the step is launch-bound there
    (Python and kernel-launch overhead, not the GPU, sets its pace)."""

    def __init__(self, device: str):
        self.device = device
        self.spans: dict[str, list] = {}
        self.host: dict[str, list[float]] = {}

    def region(self, name: str):
        timer = self

        class _Region:
            def __enter__(self):
                if timer.device == "cuda":
                    self.a = torch.cuda.Event(enable_timing=True)
                    self.b = torch.cuda.Event(enable_timing=True)
                    self.a.record()
                self.t = time.perf_counter()
                return self

            def __exit__(self, *exc):
                host = time.perf_counter() - self.t
                timer.host.setdefault(name, []).append(host * 1000)
                if timer.device == "cuda":
                    self.b.record()
                    timer.spans.setdefault(name, []).append((self.a, self.b))
                else:
                    timer.spans.setdefault(name, []).append(host)

        return _Region()

    def medians_ms(self, skip: int) -> dict[str, float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
        out = {}
        for name, xs in self.spans.items():
            vals = [(x[0].elapsed_time(x[1]) if self.device == "cuda" else x * 1000) for x in xs][skip:]
            if vals:
                out[name] = round(tt.median(vals), 3)
        return out

    def host_medians_ms(self, skip: int) -> dict[str, float]:
        return {name: round(tt.median(xs[skip:]), 3) for name, xs in self.host.items() if xs[skip:]}


def sync_audit(step: Callable[[], None], device: str) -> list[str]:
    """Where one step makes the host wait for the device (``torch.cuda.set_sync_debug_mode``):
    each synchronizing call's Python location, most frequent first. A sync inside the forward or
    backward idles the GPU while the host launches the next kernels. Empty on CPU."""
    if device != "cuda":
        return []
    import collections
    import warnings

    torch.cuda.synchronize()
    seen: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            seen[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return [f"{loc} x{n}" for loc, n in seen.most_common()]


def bench_fn(fn: Callable[[], None], device: str, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls after ``warmup``."""
    timer = Timer(device)
    for i in range(warmup + reps):
        with timer.region("x"):
            fn()
    return timer.medians_ms(warmup)["x"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="0.5b", choices=sorted(tt.SIZES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--config", default="varlen-b32", choices=sorted(tt.CONFIGS))
    p.add_argument("--steps", type=int, default=None, help="steps replayed (default 8; 3 for tiny); the first 2 are warm-up")
    p.add_argument("--no-liger", action="store_true")
    p.add_argument("--no-share", action="store_true", help="full KL forward instead of the shared prompt")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    from worker.kto.data import make_plan, tokenize_examples
    from worker.kto.lm_head import DEFAULT_GRAD_CACHE_GIB
    from worker.kto.logprobs import lm_head_impl
    from worker.kto.loss import kto_loss
    from worker.kto.packing import (
        PackContext,
        _backbone_and_head,
        _run_backbone,
        apply_liger,
        last_backends,
        pack_examples,
        pack_to,
        packed_attention,
        packed_sequence_logps,
    )

    tiny = a.size == "tiny"
    steps = a.steps or (3 if tiny else 8)
    skip = 2 if steps > 2 else 0
    device = a.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dev = torch.device(device)
    batch, plen, clen, varlen = tt.CONFIGS[a.config]
    scale = 0.125 if tiny else 1.0
    plen, clen = max(4, int(plen * scale)), max(4, int(clen * scale))
    base = tt.build_base(a.size, dtype)
    tok = tt.make_tokenizer(base.config.vocab_size - 3)
    rows = tt.make_rows(batch * steps, plen, clen, base.config.vocab_size - 3, 0.5, varlen=varlen)
    max_length = plen + clen + 8
    data, _ = tokenize_examples(rows, tok, max_length)
    plan = make_plan(len(data), batch, shuffle=False)
    model = copy.deepcopy(base).to(dev)
    liger = (not a.no_liger) and tt.liger_ok(device) and apply_liger(model)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=tt.LR, **({"fused": True} if device == "cuda" else {}))
    n_ref = len(data)
    ref = torch.zeros(n_ref, device=dev)  # the reference's values do not change the step's cost
    timer = Timer(device)
    ac = lambda: torch.autocast(device, dtype=dtype, enabled=device == "cuda")  # noqa: E731
    scored_rows = []
    host_ms: list[float] = []
    def one_step(k: int, timer: Timer) -> dict:
        """The trainer's step on microbatch ``k``: pinned host-to-device copies, packed policy + KL
        forward, loss and backward, clipping, fused AdamW (no sync of its own)."""
        mb = plan.microbatches[k % len(plan.microbatches)]
        t0 = time.perf_counter()
        host = pack_examples(data, mb, plan, max_length, kl=True, share_prompt=not a.no_share)
        host["index"] = torch.tensor(mb, dtype=torch.long)
        host["desirable"] = torch.tensor([data[i].desirable for i in mb], dtype=torch.bool)
        host_ms.append((time.perf_counter() - t0) * 1000)
        with timer.region("step total"):
            with timer.region("H2D"):
                b = pack_to(host, dev)
            with timer.region("forward policy + KL"), ac():
                pol, pol_kl = packed_sequence_logps(model, b)
            with timer.region("loss + backward"):
                r = ref[b["index"]]
                out = kto_loss(pol, r, b["desirable"], pol_kl, r, beta=tt.BETA)
                out.loss.backward()
            with timer.region("clip + AdamW"):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        scored_rows.append((int(b["targets"].numel()), int(b["kl_targets"].numel() + b["kl_first_targets"].numel())))
        return b

    with packed_attention(model):
        for k in range(steps):
            b = one_step(k, timer)
        phases = timer.medians_ms(skip)
        host_issue = timer.host_medians_ms(skip)
        phases["host pack (CPU; overlapped with the device in training)"] = round(tt.median(host_ms[skip:] or [0.0]), 3)
        syncs = sync_audit(lambda: one_step(steps, Timer(device)), device)
        backends = last_backends()

        # ---- apart: the backbone alone (policy forward + backward, no LM head) on the last pack
        inner, backbone, head = _backbone_and_head(model)

        def backbone_only():
            ctx = PackContext(b["cu_seqlens"], b["cu_seqlens"], b["cu_list"], b["cu_list"], b["max_seqlen"],
                              b["max_seqlen"])
            ctx.pos_q = ctx.pos_k = b["position_ids"][0]
            with ac():
                h = _run_backbone(backbone, b["input_ids"], b["position_ids"], ctx)
            h.float().square().mean().backward()
            opt.zero_grad(set_to_none=True)

        reps = 3 if tiny else 5
        apart = {"backbone fwd+bwd (policy rows, no LM head)": bench_fn(backbone_only, device, reps)}
    # ---- apart: the LM head alone, forward + backward on the policy's rows, then forward only on the KL's
    n_pol, n_kl = tt.median(scored_rows)
    hdim = head.weight.shape[1]
    rows_max = max(n_pol, n_kl)
    hid = torch.randn(rows_max, hdim, device=dev, dtype=dtype)
    tgt = torch.randint(0, head.weight.shape[0], (rows_max,), device=dev)
    hid_pol = hid[:n_pol].clone().requires_grad_()
    # "fused" keeps the logits' gradient from the forward (the default budget), "+ recompute" does not,
    # "+ recompute in groups" holds half the rows' gradient at a time in the backward (a budget under the rows')
    half = (n_pol + 1) // 2 * head.weight.shape[0] * dtype.itemsize / 2**30
    for impl, gib in (("fused", DEFAULT_GRAD_CACHE_GIB), ("fused", 0.0), ("fused", half),
                      ("fused-eager", DEFAULT_GRAD_CACHE_GIB), ("checkpoint", 0.0)):
        def head_fb(impl=impl, gib=gib):
            with lm_head_impl(impl, gib), ac():
                lp = tt_token_logps(hid_pol, tgt[:n_pol], head)
            lp.sum().backward()
            hid_pol.grad = None
            head.weight.grad = None

        name = impl + ({0.0: " + recompute", half: " + recompute in groups"}.get(gib, "") if impl != "checkpoint"
                       else "")
        apart[f"LM head fwd+bwd, {n_pol} rows, {name}"] = bench_fn(head_fb, device, reps)
    with torch.no_grad():
        kh, kt = hid[:n_kl], tgt[:n_kl]
        for impl in ("fused", "fused-eager"):
            def head_f(impl=impl):
                with lm_head_impl(impl), ac():
                    tt_token_logps(kh, kt, head)

            apart[f"LM head fwd, {n_kl} KL rows, {impl}"] = bench_fn(head_f, device, reps)

    tokens = sum(len(data[i].prompt_ids) + len(data[i].completion_ids) for i in plan.microbatches[0])
    res = {"env": {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                   "size": a.size, "config": a.config, "liger": bool(liger), "share_prompt": not a.no_share,
                   "attn_backends": backends, "steps": steps, "timed_from_step": skip + 1},
           "step_phases_ms": phases, "host_issue_ms": host_issue, "syncs_in_step": syncs, "apart_ms": apart,
           "tokens_first_step": tokens}
    lines = [f"Prospect step phases, {a.config} on {res['env']['device']} (median of steps {skip + 1}-{steps}, ms)", "",
             "| phase | device ms | host ms issuing it |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {host_issue[k]:.2f} |" if k in host_issue else f"| {k} | {v:.2f} | |"
              for k, v in phases.items()]
    if device == "cuda":
        lines += ["", "host waits for the device inside one step (torch.cuda.set_sync_debug_mode): "
                  + (", ".join(syncs) if syncs else "none")]
    lines += ["", "| measured apart | ms |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in apart.items()]
    cmd = "python bench/step_phases.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    text = "\n".join(lines) + f"\n\nrerun: {cmd}\n"
    print(text, flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))
    return res


def tt_token_logps(hidden, targets, head):
    from worker.kto.logprobs import token_logps_from_hidden

    return token_logps_from_hidden(hidden, targets, head, None)


if __name__ == "__main__":
    main()
