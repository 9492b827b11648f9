"""KTO training throughput: Prospect's trainer against TRL's KTOTrainer, side by side (issue 4).

Follows ../shared/bench/PROTOCOL.md. Both sides train the same random-weight Qwen2-shaped model
(0.5B = Qwen2.5-0.5B's shape, vocabulary 151,936; or ``tiny``) on the same synthetic rows made
by the word-level tokenizer of TRL's baseline runner (ported from bench/trl_kto_baseline.py, a
copy of the shared one), in one process on one device: same dtype (bf16 on CUDA, float32 on
CPU), batch, KL microbatch (sequential, completions rotated by one), β, learning rate and
schedule, AdamW. Each side uses its own speed tricks: TRL its best configuration, precomputed
reference log-probs + Liger layer kernels (Liger only where it imports, on CUDA); Prospect
packing, the shared-prompt KL forward, Liger layer kernels (same condition), fused AdamW.

Measured per configuration and side: real (non-pad) tokens per second at the median step after
warm-up (prompt + completion tokens per step, counted as the baseline counts them), seconds per
step, peak memory (torch.cuda.max_memory_allocated, reset between sides), the ratios to TRL; and
parity: per-example reference log-probs (and the KL pairs') on the same rows, per-example policy
log-probs of the first microbatch after the run, the loss of every step, and the step-1 loss
against 0.5·mean(λ) (policy == reference there).

  python bench/train_throughput.py --size 0.5b --configs varlen-b32,fixed-b32     # on a GPU
  python bench/train_throughput.py --size tiny --device cpu                       # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ----------------------------------------------------------------------------- ported from the baseline
# bench/trl_kto_baseline.py (verbatim copy of ../shared/bench/trl_kto_baseline.py): SIZES, make_tokenizer,
# make_rows. Ported rather than imported because the baseline imports trl and datasets at module level,
# and the Prospect side must run where they are missing. tests/kto/test_bench_train.py checks the port.

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    # Qwen2.5-0.5B shape
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    # Qwen2.5-1.5B shape
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
}


def make_tokenizer(n_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n_words)}
    for t in ("<pad>", "<eos>", "<unk>"):
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.padding_side = "left"
    return fast


def make_rows(n: int, plen: int, clen: int, n_words: int, desirable_frac: float, seed: int = 0,
              varlen: bool = False) -> list[dict]:
    """Fixed lengths, or (varlen) lengths uniform in [len/8, len] as real chat data has."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(n_words)}" for _ in range(k))  # noqa: E731
    pick = (lambda k: rng.randint(max(2, k // 8), k)) if varlen else (lambda k: k)  # noqa: E731
    return [{"prompt": words(pick(plen)) + " ", "completion": words(pick(clen) - 1) + " ",
             "label": rng.random() < desirable_frac} for _ in range(n)]


# ----------------------------------------------------------------------------- configurations

#: name -> (batch, prompt tokens, completion tokens, varlen); PROTOCOL.md's table
CONFIGS = {
    "fixed-b8": (8, 256, 256, False),
    "varlen-b8": (8, 512, 512, True),
    "fixed-b32": (32, 256, 256, False),
    "varlen-b32": (32, 512, 512, True),
}
#: TRL 1.16 on an H200 (PROTOCOL.md): best configuration, precomputed reference + Liger where measured
TRL_H200 = {
    "fixed-b8": {"tokens_per_s": 29690, "peak_mem_gib": 9.9, "mode": "precompute"},
    "varlen-b8": {"tokens_per_s": 33368, "peak_mem_gib": 15.5, "mode": "precompute"},
    "fixed-b32": {"tokens_per_s": 104882, "peak_mem_gib": 19.7, "mode": "precompute+liger"},
    "varlen-b32": {"tokens_per_s": 40203, "peak_mem_gib": 37.6, "mode": "precompute+liger"},
}
TARGETS = {"varlen-b32": 2.0, "fixed-b32": 1.1}  # × TRL's best tokens/s (varlen-b32: at no more peak memory)
BETA, LR = 0.1, 5e-6  # PROTOCOL.md (and the baseline's KTOConfig)

#: side name -> what it runs. "liger" sides use Liger's layer kernels where liger_kernel imports on CUDA.
SIDES = {
    "trl": dict(impl="trl", liger=True),  # TRL's best: precomputed reference + Liger
    "trl-plain": dict(impl="trl", liger=False),  # precomputed reference only
    "trl-repeat": dict(impl="trl", liger=True),  # "trl" once more: the baseline's own drift within a process
    # today's defaults (cuda_graphs="auto": fixed-length steps replayed from a CUDA graph, variable ones eager)
    "prospect": dict(impl="prospect", liger=True, packing=True),
    "prospect-eager": dict(impl="prospect", liger=True, packing=True, cuda_graphs=False),
    # the LM head's backward recomputes the logits instead of using the gradient kept from the forward
    "prospect-recompute": dict(impl="prospect", liger=True, packing=True, lm_head_grad_cache_gib=0.0),
    "prospect-noliger": dict(impl="prospect", liger=False, packing=True),
    "prospect-padded": dict(impl="prospect", liger=False, packing=False),
    "prospect-noshare": dict(impl="prospect", liger=True, packing=True, share_prompt_kv=False),
    "prospect-compile": dict(impl="prospect", liger=True, packing=True, compile_layers=True),
    "prospect-compile-noliger": dict(impl="prospect", liger=False, packing=True, compile_layers=True),
    # "prospect" once more, last in its configuration: how far the same side drifts within one process
    "prospect-repeat": dict(impl="prospect", liger=True, packing=True),
    # LM-head chunks of 4096 rows instead of 1024: fewer passes over the float32 weight-gradient
    # accumulator and a deeper reduction in its product, for ~2.8 GiB more transient memory
    "prospect-chunk4k": dict(impl="prospect", liger=True, packing=True, logits_chunk_size=4096),
    "prospect-eagerhead": dict(impl="prospect", liger=True, packing=True, lm_head="fused-eager"),
    "prospect-ckpthead": dict(impl="prospect", liger=True, packing=True, lm_head="checkpoint"),
    # every step replayed as one CUDA graph (cuda_graphs=True, asked for); shapes must repeat, so fixed-length
    # configurations only (the varlen ones skip it)
    "prospect-graphs": dict(impl="prospect", liger=True, packing=True, cuda_graphs=True),
    "prospect-graphs-chunk4k": dict(impl="prospect", liger=True, packing=True, cuda_graphs=True,
                                    logits_chunk_size=4096),
    # variable lengths: packs padded to 1024-token buckets, so that a few graphs serve every step
    "prospect-graphs-bucketed": dict(impl="prospect", liger=True, packing=True, cuda_graphs=True, pack_bucket=1024),
}


def liger_ok(device: str) -> bool:
    if device != "cuda":
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> float | None:
    """Free what the previous side left and restart the peak; returns GiB still allocated (a
    leftover would count in this side's peak: reported beside it)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return round(torch.cuda.memory_allocated() / 2**30, 2)
    return None


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def peak_reserved_gib(device: str) -> float | None:
    """What the caching allocator held at most (allocated + cached + CUDA graph pools): beside the
    protocol's allocated peak, since a graph's pool stays reserved between replays."""
    return round(torch.cuda.max_memory_reserved() / 2**30, 2) if device == "cuda" else None


def gpu_state(device: str) -> dict | None:
    """SM clock, temperature and power right after a side ran (torch.cuda's NVML readers; None
    where NVML is missing): tells a throttled card from a slow side when runs disagree."""
    if device != "cuda":
        return None
    out = {}
    for key, fn in (("sm_mhz", "clock_rate"), ("temp_c", "temperature"), ("power_mw", "power_draw")):
        try:
            out[key] = int(getattr(torch.cuda, fn)())
        except Exception:
            pass
    return out or None


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def autocast(device: str, dtype: torch.dtype):
    return torch.autocast(device, dtype=dtype, enabled=(device == "cuda" and dtype != torch.float32))


def build_base(size: str, dtype: torch.dtype):
    """The baseline's model: Qwen2 from a config, seed 0, random weights, in ``dtype``, on CPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(dtype)


# ----------------------------------------------------------------------------- the sides

def run_trl(base, tok, rows, batch, steps, warmup, max_length, device, dtype, liger, probe, lr=LR) -> dict:
    """TRL's KTOTrainer with precomputed reference log-probs (+ Liger when asked and available)."""
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import KTOConfig, KTOTrainer

    class Recorder(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            self.times.append(time.perf_counter() - self.t0)

    model = copy.deepcopy(base)
    ref = copy.deepcopy(base)
    out_dir = tempfile.mkdtemp(prefix="kto-bench-trl-")
    args = KTOConfig(
        output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps + warmup, learning_rate=lr, beta=BETA,
        max_length=max_length, logging_steps=1000, save_strategy="no", report_to="none",
        bf16=(dtype == torch.bfloat16 and device == "cuda"), precompute_ref_log_probs=True, dataloader_num_workers=0,
        disable_tqdm=True, use_cpu=(device == "cpu"), use_liger_kernel=liger, seed=0,
        # as the protocol's baseline runs it (its --gc flag off); TRL 1.16 would otherwise default to True
        gradient_checkpointing=False,
    )
    rec = Recorder()
    start_mem = reset_peak(device)
    t0 = time.perf_counter()
    trainer = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[rec])
    losses: list[float] = []
    orig = trainer.compute_loss

    def recording(*a, **k):
        out = orig(*a, **k)
        losses.append(out.detach().float().item())
        return out

    trainer.compute_loss = recording
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    peak = peak_gib(device)
    ds = trainer.train_dataset
    ref_logps = torch.tensor(ds["ref_logps"], dtype=torch.float32)
    ref_kl = torch.tensor(ds["ref_KL_logps"], dtype=torch.float32)
    m = trainer.model
    m.eval()
    with torch.no_grad(), autocast(device, dtype):
        b = {k: v.to(m.device) for k, v in probe.items()}
        labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
        pol = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels,
                fused_lm_head=True).log_probs.float().sum(-1).cpu()
    res = dict(impl=f"trl-{trl.__version__}", liger=liger, times=rec.times[warmup:], losses=losses, peak_mem_gib=peak,
               peak_reserved_gib=peak_reserved_gib(device),
               start_mem_gib=start_mem,
               setup_s=round(t1 - t0, 2), train_s=round(t2 - t1, 2), ref_logps=ref_logps, ref_kl_logps=ref_kl,
               policy_logps=pol)
    del trainer, model, ref, m
    reset_peak(device)
    return res


def run_prospect(base, tok, rows, batch, steps, warmup, max_length, device, dtype, side: dict, probe_mb,
                 lr=LR) -> dict:
    """Prospect's train_kto on the same rows, microbatches and schedule."""
    from accelerate import Accelerator

    from worker.kto import lm_head as lm_head_mod
    from worker.kto.data import collate_microbatch, make_plan, tokenize_examples
    from worker.kto.lm_head import DEFAULT_GRAD_CACHE_GIB
    from worker.kto.logprobs import sequence_logps
    from worker.kto.packing import last_backends, pack_examples, pack_to, packed_attention, packed_sequence_logps
    from worker.kto.trainer import KTOTrainConfig, resolve_liger, train_kto

    cfg = KTOTrainConfig(
        beta=BETA, learning_rate=lr, lr_scheduler="linear", warmup_steps=0, max_steps=steps + warmup,
        microbatch_size=batch, shuffle=False, max_length=max_length, max_grad_norm=1.0, weight_decay=0.0,
        save_final=False, seed=0, packing=side.get("packing", True), liger_kernels=side.get("liger", False),
        cuda_graphs=side.get("cuda_graphs", "auto"), pack_bucket=side.get("pack_bucket", 0),
        share_prompt_kv=side.get("share_prompt_kv", True), compile_layers=side.get("compile_layers", False),
        lm_head=side.get("lm_head", "fused"), logits_chunk_size=side.get("logits_chunk_size", 1024),
        lm_head_grad_cache_gib=side.get("lm_head_grad_cache_gib", DEFAULT_GRAD_CACHE_GIB),
        mixed_precision="bf16" if (device == "cuda" and dtype == torch.bfloat16) else "no",
    )
    model = copy.deepcopy(base)
    times: list[float] = []
    losses: list[float] = []
    last = [None]

    modes: list[str] = []

    def callback(m: dict) -> None:
        # No sync here: on CUDA the trainer reads a step's metrics back a step late so that the
        # host issues the next step while the device finishes this one (worker/kto/readout.py); a
        # sync per step would serialise them again. Its device_step_s, the time between the ends
        # of two steps on the device's clock, is what a step costs; the CPU has only the wall clock.
        now = time.perf_counter()
        step_s = m.get("device_step_s") or (now - last[0] if last[0] is not None else None)
        if step_s is not None:
            times.append(step_s)
            modes.append(m.get("step_mode", "eager"))  # with CUDA graphs: eager | rehearsal | capture | replay
        last[0] = now
        losses.append(m["loss"])

    out_dir = tempfile.mkdtemp(prefix="kto-bench-prospect-")
    acc = Accelerator(cpu=(device == "cpu"), **({"mixed_precision": "bf16"} if cfg.mixed_precision == "bf16" else {}))
    start_mem = reset_peak(device)
    t0 = time.perf_counter()
    result = train_kto(cfg, model, rows, out_dir, tokenizer=tok, resume=False, callback=callback, accelerator=acc)
    t1 = time.perf_counter()
    peak = peak_gib(device)
    backends = last_backends() if cfg.packing else {}
    table = torch.load(Path(out_dir) / "reference_logps.pt", weights_only=True)
    m = result.model
    m.eval()
    data, _ = tokenize_examples(rows, tok, max_length)
    plan = make_plan(len(data), batch, shuffle=False)
    with torch.no_grad(), autocast(device, dtype):
        b = {k: v.to(m.device) for k, v in collate_microbatch(data, probe_mb, plan, tok.pad_token_id).items()}
        pol_padded = sequence_logps(m, b["input_ids"], b["attention_mask"], b["completion_mask"]).cpu()
        with packed_attention(m):
            pol_packed, _ = packed_sequence_logps(m, pack_to(pack_examples(data, probe_mb, plan, kl=False), m.device))
    # steps after warm-up: callback k measures step k (k >= 2); keep steps warmup+1 ..
    res = dict(impl="prospect", side=side, times=times[max(0, warmup - 1):], step_modes=modes[max(0, warmup - 1):],
               losses=losses, peak_mem_gib=peak,
               peak_reserved_gib=peak_reserved_gib(device),
               start_mem_gib=start_mem,
               train_s=round(t1 - t0, 2), ref_logps=table["ref"], ref_kl_logps=table["ref_kl"],
               policy_logps=pol_packed.cpu(), policy_logps_padded=pol_padded,
               runtime=dict(packing=cfg.packing,
                            liger=bool(resolve_liger(cfg, torch.device(device)) and liger_ok(device)),
                            attn_backends=backends, lm_head=cfg.lm_head,
                            lm_head_grad_cache_gib=cfg.lm_head_grad_cache_gib,
                            cuda_graph_replays=result.runtime.get("cuda_graph_replays", 0),
                            lm_head_compiled=bool(cfg.lm_head == "fused" and device == "cuda"
                                                  and not lm_head_mod._COMPILE_BROKEN)))
    del result, m, model
    reset_peak(device)
    return res


# ----------------------------------------------------------------------------- parity and report

def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, 1): relative for sums of many log-probs, absolute near zero."""
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max()) if a.numel() else 0.0


def parity(trl: dict, ours: dict, lambdas_mean: float, fp32: bool) -> dict:
    """Differences between the sides, and whether each is inside its tolerance (float32 tight;
    bf16 allows the rounding of two different kernels' schedules)."""
    # bf16: TRL's own step-1 loss was seen 3.3e-3 away from the exact 0.5·mean(λ) on an H100 (its
    # policy and precomputed reference log-probs come from differently shaped bf16 batches), so
    # losses are held to 5e-3 there; log-probs, the sharper check, to 2e-3 relative.
    tol_lp, tol_loss, tol_step1 = (2e-5, 1e-4, 1e-5) if fp32 else (2e-3, 5e-3, 5e-3)
    n = min(len(trl["losses"]), len(ours["losses"]))
    loss_diff = max((abs(a - b) for a, b in zip(trl["losses"][:n], ours["losses"][:n])), default=float("nan"))
    out = {
        "ref_logps_max_rel": max_rel(ours["ref_logps"], trl["ref_logps"]),
        "ref_kl_logps_max_rel": max_rel(ours["ref_kl_logps"], trl["ref_kl_logps"]),
        "policy_logps_max_rel": max_rel(ours["policy_logps"], trl["policy_logps"]),
        "policy_logps_padded_vs_packed_max_rel": max_rel(ours["policy_logps"], ours["policy_logps_padded"]),
        "loss_max_abs_diff": loss_diff,
        # how far the loss moved from step 1: the loss comparison means something only when this is larger
        "loss_moved": max((abs(x - trl["losses"][0]) for x in trl["losses"]), default=0.0),
        "losses_trl": [round(x, 6) for x in trl["losses"]],
        "losses_prospect": [round(x, 6) for x in ours["losses"]],
        "step1_expected": 0.5 * lambdas_mean,
        "step1_trl": trl["losses"][0] if trl["losses"] else None,
        "step1_prospect": ours["losses"][0] if ours["losses"] else None,
        "tolerances": {"logps_rel": tol_lp, "loss_abs": tol_loss, "step1_abs": tol_step1},
    }
    out["pass"] = bool(
        out["ref_logps_max_rel"] <= tol_lp and out["ref_kl_logps_max_rel"] <= tol_lp
        and out["policy_logps_max_rel"] <= tol_lp * 5 and loss_diff <= tol_loss
        and abs(out["step1_trl"] - out["step1_expected"]) <= tol_step1
        and abs(out["step1_prospect"] - out["step1_expected"]) <= tol_step1
    )
    return out


def ratios(rec: dict, raw: dict) -> str | None:
    """Each side's tokens/s and peak memory against TRL's in ``rec`` (in place); the TRL side used."""
    trl_side = next((s for s in ("trl", "trl-plain") if s in raw), None)
    if trl_side:
        t = rec["sides"][trl_side]
        for side, v in rec["sides"].items():
            if "tokens_per_s" in v and side != trl_side:
                v["speedup_vs_trl"] = round(v["tokens_per_s"] / t["tokens_per_s"], 3)
                if v.get("replayed_tokens_per_s"):
                    v["replayed_speedup_vs_trl"] = round(v["replayed_tokens_per_s"] / t["tokens_per_s"], 3)
                if v["peak_mem_gib"] and t["peak_mem_gib"]:
                    v["mem_vs_trl"] = round(v["peak_mem_gib"] / t["peak_mem_gib"], 3)
    return trl_side


def run_config(name: str, a, device: str, dtype: torch.dtype, base, tok, sides: list[str],
               progress: Callable[[dict], None] | None = None) -> dict:
    batch, plen, clen, varlen = CONFIGS[name]
    plen, clen = max(4, int(plen * a.len_scale)), max(4, int(clen * a.len_scale))
    n_words = base.config.vocab_size - 3
    total = a.steps + a.warmup
    rows = make_rows(batch * total, plen, clen, n_words, 0.5, varlen=varlen)
    max_length = plen + clen + 8
    # real tokens per step, as the baseline counts them: prompt + completion words + EOS, averaged
    tokens = sum(len(r["prompt"].split()) + len(r["completion"].split()) + 1 for r in rows) / total
    from worker.kto.data import collate_microbatch, make_plan, tokenize_examples

    data, _ = tokenize_examples(rows, tok, max_length)
    plan = make_plan(len(data), batch, shuffle=False)
    probe_mb = plan.microbatches[0]
    probe = collate_microbatch(data, probe_mb, plan, tok.pad_token_id)
    rec: dict[str, Any] = {"config": name, "batch": batch, "plen": plen, "clen": clen, "varlen": varlen,
                           "tokens_per_step": round(tokens, 1), "sides": {}}
    raw: dict[str, dict] = {}  # each side's first run (parity)
    pooled: dict[str, dict] = {}  # each side's timed steps over all its runs
    # sides without Liger first: Liger's RoPE patch is process-wide once applied, so only sides that
    # run with Liger (or every side, where Liger is unavailable) are repeated in later rounds
    queue = sorted(sides, key=lambda s: SIDES[s].get("liger", False) and liger_ok(device))
    repeatable = [s for s in queue if not liger_ok(device) or SIDES[s].get("liger", False)]
    plan_runs = [(0, s) for s in queue] + [(k, s) for k in range(1, a.repeats) for s in repeatable]
    while plan_runs:
        rnd, side = plan_runs.pop(0)
        if rnd > 0 and side not in raw:
            continue  # failed in round 0
        spec = SIDES[side]
        if spec.get("cuda_graphs") is True and (device != "cuda" or (varlen and not spec.get("pack_bucket"))):
            rec["sides"][side] = {"skipped": "CUDA graphs replay repeating shapes only (on CUDA: fixed lengths, "
                                             "or packs padded to buckets)"}
            continue
        t = time.perf_counter()
        try:
            if spec["impl"] == "trl":
                r = run_trl(base, tok, rows, batch, a.steps, a.warmup, max_length, device, dtype,
                            spec["liger"] and liger_ok(device), probe, a.lr)
            else:
                s = dict(spec, liger=spec.get("liger", False) and liger_ok(device))
                r = run_prospect(base, tok, rows, batch, a.steps, a.warmup, max_length, device, dtype, s, probe_mb, a.lr)
        except Exception as e:  # one failed side must not cost the others
            traceback.print_exc()
            reset_peak(device)
            if rnd == 0:
                rec["sides"][side] = {"error": repr(e)[:800]}
                if side == "trl" and "trl-plain" not in sides and spec["liger"] and liger_ok(device):
                    plan_runs.insert(0, (0, "trl-plain"))  # TRL with Liger failed here: keep a TRL figure all the same
                    sides = sides + ["trl-plain"]
            continue
        r["gpu_after"] = gpu_state(device)
        med = median(r["times"]) if r["times"] else float("nan")
        print(json.dumps({"config": name, "side": side, "round": rnd, "median_step_s": round(med, 4),
                          "tokens_per_s": round(tokens / med, 1), "peak_mem_gib": r["peak_mem_gib"],
                          "gpu_after": r["gpu_after"], "wall_s": round(time.perf_counter() - t, 1)}), flush=True)
        pool = pooled.setdefault(side, {"times": [], "modes": [], "runs": [], "peak": [], "reserved": [], "gpu": []})
        pool["times"] += r["times"]
        pool["modes"] += r.get("step_modes") or ["eager"] * len(r["times"])
        pool["runs"].append(round(tokens / med, 1))
        pool["peak"].append(r["peak_mem_gib"])
        pool["reserved"].append(r.get("peak_reserved_gib"))
        pool["gpu"].append(r["gpu_after"])
        if side not in raw:
            raw[side] = r
            rec["sides"][side] = {
                "impl": r["impl"], "liger": r.get("liger", r.get("runtime", {}).get("liger")),
                "start_mem_gib": r.get("start_mem_gib"),
                **({"attn_backends": r["runtime"]["attn_backends"]} if r.get("runtime", {}).get("attn_backends")
                   else {}),
                **({"lm_head": r["runtime"]["lm_head"], "lm_head_compiled": r["runtime"]["lm_head_compiled"],
                    "lm_head_grad_cache_gib": r["runtime"]["lm_head_grad_cache_gib"],
                    "cuda_graph_replays": r["runtime"]["cuda_graph_replays"]}
                   if "lm_head" in r.get("runtime", {}) else {}),
            }
        v, ts = rec["sides"][side], sorted(pool["times"])
        pm = median(ts) if ts else float("nan")
        v.update({"median_step_s": round(pm, 4), "tokens_per_s": round(tokens / pm, 1),
                  "step_s_p10": round(ts[len(ts) // 10], 4) if ts else None,
                  "step_s_p90": round(ts[(len(ts) * 9) // 10], 4) if ts else None,
                  "tokens_per_s_runs": pool["runs"], "peak_mem_gib": max(x for x in pool["peak"] if x is not None)
                  if any(x is not None for x in pool["peak"]) else None,
                  "peak_reserved_gib_runs": pool["reserved"], "timed_steps": len(ts),
                  "step_times_s": [round(x, 5) for x in pool["times"]],
                  "gpu_after": pool["gpu"]})
        replayed = [t for t, mode in zip(pool["times"], pool["modes"]) if mode == "replay"]
        if set(pool["modes"]) - {"eager"}:  # the steady state apart from the steps that captured a new shape
            v["step_modes"] = {mode: pool["modes"].count(mode) for mode in dict.fromkeys(pool["modes"])}
            if replayed:
                v["replayed_median_step_s"] = round(median(replayed), 4)
                v["replayed_tokens_per_s"] = round(tokens / median(replayed), 1)
        if progress is not None:  # a run cut short by a timeout keeps every side measured so far
            ratios(rec, raw)
            progress(rec)
    trl_side = ratios(rec, raw)
    if trl_side:
        if "prospect" in raw:
            lam = 1.0  # λD = λU = 1 on both sides
            rec["parity"] = parity(raw[trl_side], raw["prospect"], lam, dtype == torch.float32)
    rec["trl_h200_reference"] = TRL_H200.get(name)
    if name in TARGETS:
        rec["target_speedup"] = TARGETS[name]
    return rec


def table(records: list[dict], device_name: str) -> str:
    lines = [f"KTO training throughput on {device_name}", "",
             "| config | side | tokens/s | s/step (p10-p90) | tok/s per run | peak GiB | vs TRL (tok/s) | vs TRL (mem) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        for side, v in r["sides"].items():
            if "error" in v or "skipped" in v:
                why = f"error: {v['error'][:60]}" if "error" in v else f"skipped: {v['skipped']}"
                lines.append(f"| {r['config']} | {side} | {why} | | | | | |")
                continue
            kernels = "/".join(dict.fromkeys(v.get("attn_backends", {}).values()))
            graphs = f", {v['cuda_graph_replays']} steps from a CUDA graph" if v.get("cuda_graph_replays") else ""
            extras = f"{', liger' if v.get('liger') else ''}{', ' + kernels if kernels else ''}{graphs}"
            name = f"{side} ({v['impl']}{extras})"
            runs = " / ".join(f"{x:,.0f}" for x in v.get("tokens_per_s_runs", []))
            lines.append(f"| {r['config']} | {name} | {v['tokens_per_s']:,.0f} | {v['median_step_s']:.4f} "
                         f"({v.get('step_s_p10') or 0:.4f}-{v.get('step_s_p90') or 0:.4f}) | {runs} | "
                         f"{v['peak_mem_gib'] if v['peak_mem_gib'] is not None else '-'} | "
                         f"{v.get('speedup_vs_trl', 1.0 if side.startswith('trl') else '-')} | "
                         f"{v.get('mem_vs_trl', '-')} |")
    lines.append("")
    for r in records:
        p = r.get("parity")
        if p:
            lines.append(
                f"parity {r['config']}: {'PASS' if p['pass'] else 'FAIL'} | ref logps max rel {p['ref_logps_max_rel']:.2e}"
                f" (KL {p['ref_kl_logps_max_rel']:.2e}) | policy logps after {len(p['losses_prospect'])} steps max rel "
                f"{p['policy_logps_max_rel']:.2e} | loss max |Δ| {p['loss_max_abs_diff']:.2e} (moved "
                f"{p['loss_moved']:.2e}) | step-1 loss "
                f"trl {p['step1_trl']:.6f} prospect {p['step1_prospect']:.6f} (0.5·mean λ = {p['step1_expected']})")
        for side, v in r["sides"].items():
            if "step_modes" in v:
                modes = ", ".join(f"{k} {n}" for k, n in v["step_modes"].items())
                vs = f", {v['replayed_speedup_vs_trl']}x TRL" if "replayed_speedup_vs_trl" in v else ""
                steady = (f"; replayed steps alone: median {v['replayed_median_step_s']:.4f} s, "
                          f"{v['replayed_tokens_per_s']:,.0f} tok/s{vs}" if "replayed_tokens_per_s" in v else "")
                lines.append(f"graphs {r['config']} {side}: timed steps {modes}{steady}")
        if r.get("target_speedup") and "prospect" in r["sides"] and "speedup_vs_trl" in r["sides"]["prospect"]:
            v = r["sides"]["prospect"]
            mem = "" if v.get("mem_vs_trl") is None else f", memory {v['mem_vs_trl']}x"
            lines.append(f"target {r['config']}: >= {r['target_speedup']}x TRL's best here -> {v['speedup_vs_trl']}x{mem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--configs", default="varlen-b32,fixed-b32,varlen-b8,fixed-b8")
    p.add_argument("--sides", default="trl,prospect", help=f"comma list of {sorted(SIDES)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps after --warmup (default 8; 3 for tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; 1 for tiny)")
    p.add_argument("--len-scale", type=float, default=None,
                   help="scale the configurations' lengths (default 1; 0.125 for --size tiny)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the sides this many times, interleaved (A B A B); figures pool every run's timed steps")
    p.add_argument("--lr", type=float, default=LR, help="learning rate of both sides (PROTOCOL.md: 5e-6; a larger "
                   "one makes the loss move further on a tiny model, a stronger trajectory check)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--table-out", default=None)
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no further configuration once this many seconds have passed")
    a = p.parse_args(argv)
    tiny = a.size == "tiny"
    a.len_scale = a.len_scale if a.len_scale is not None else (0.125 if tiny else 1.0)
    a.steps = a.steps if a.steps is not None else (3 if tiny else 8)
    a.warmup = a.warmup if a.warmup is not None else (1 if tiny else 3)
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (the first step's start is not observable on Prospect's side)")
    device = a.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; pass --device cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    configs = [c for c in a.configs.split(",") if c]
    sides = [s for s in a.sides.split(",") if s]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}; one of {sorted(CONFIGS)}")
    for s in sides:
        if s not in SIDES:
            p.error(f"unknown side {s!r}; one of {sorted(SIDES)}")
    if device == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    t_start = time.perf_counter()
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    base = build_base(a.size, dtype)
    tok = make_tokenizer(base.config.vocab_size - 3)
    env = {"device": device_name, "torch": torch.__version__, "size": a.size, "dtype": str(dtype).replace("torch.", ""),
           "params": sum(p.numel() for p in base.parameters()), "steps": a.steps, "warmup": a.warmup,
           "len_scale": a.len_scale, "lr": a.lr, "liger_available": liger_ok(device)}
    try:
        import transformers

        env["transformers"] = transformers.__version__
        import trl

        env["trl"] = trl.__version__
    except Exception as e:
        env["trl"] = f"unavailable: {e!r}"[:200]
    print(json.dumps({"env": env}), flush=True)
    records: list[dict] = []

    def save(current: dict | None = None) -> None:
        """The JSON so far (``current``: the configuration still running)."""
        if a.json_out:
            done = records + ([current] if current is not None else [])
            Path(a.json_out).write_text(json.dumps({"env": env, "records": done}, indent=1, default=str))

    for c in configs:
        if a.deadline_s is not None and time.perf_counter() - t_start > a.deadline_s:
            print(json.dumps({"config": c, "skipped": "deadline"}), flush=True)
            continue
        records.append(run_config(c, a, device, dtype, base, tok, sides, progress=save))
        save()
    text = table(records, device_name)
    cmd = "python bench/train_throughput.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    text += f"\n\nrerun: {cmd}\n"
    print("\n" + text, flush=True)
    if a.table_out:
        Path(a.table_out).write_text(text)
    return records


if __name__ == "__main__":
    main()
