# Copied verbatim (below this note) from ../shared/bench/trl_kto_baseline.py, the anchor runner that
# ../shared/bench/PROTOCOL.md describes, so that it travels to the GPU machine with the repo (../shared
# does not). bench/train_throughput.py ports its model sizes, tokenizer and rows; the test
# tests/kto/test_bench_train.py checks that the port still produces identical rows.
"""Anchor measurement: TRL KTOTrainer throughput on a random-init causal LM.

Runs offline (no hub): model from a config, word-level tokenizer built in memory,
synthetic prompt/completion/label rows. Prints one JSON line per configuration.
Usage: python trl_kto_bench.py --size {tiny,0.5b} --steps N --batch B --plen P --clen C
"""
import argparse, copy, json, os, random, time

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

from trl import KTOConfig, KTOTrainer

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


def make_tokenizer(n_words):
    vocab = {f"w{i}": i for i in range(n_words)}
    for t in ("<pad>", "<eos>", "<unk>"):
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.padding_side = "left"
    return fast


def make_rows(n, plen, clen, n_words, desirable_frac, seed=0, varlen=False):
    """Fixed lengths, or (varlen) lengths uniform in [len/8, len] as real chat data has."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(n_words)}" for _ in range(k))
    pick = (lambda k: rng.randint(max(2, k // 8), k)) if varlen else (lambda k: k)
    return [{"prompt": words(pick(plen)) + " ", "completion": words(pick(clen) - 1) + " ",
             "label": rng.random() < desirable_frac} for _ in range(n)]


class StepTimer(TrainerCallback):
    def __init__(self, warmup):
        self.warmup, self.times, self.t0 = warmup, [], None

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)


def run(size, steps, batch, plen, clen, precompute, warmup, dtype, gc, varlen=False, liger=False):
    cfg = Qwen2Config(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    ref = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_words = cfg.vocab_size - 3
    tok = make_tokenizer(n_words)
    rows = make_rows(batch * (steps + warmup), plen, clen, n_words, 0.5, varlen=varlen)
    ds = Dataset.from_list(rows)
    args = KTOConfig(
        output_dir="/tmp/kto-bench-out", per_device_train_batch_size=batch, max_steps=steps + warmup,
        learning_rate=5e-6, beta=0.1, max_length=plen + clen + 8, logging_steps=1000, save_strategy="no",
        report_to="none", bf16=(dtype == torch.bfloat16 and torch.cuda.is_available()),
        precompute_ref_log_probs=precompute, gradient_checkpointing=gc, dataloader_num_workers=0,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), use_liger_kernel=liger,
    )
    timer = StepTimer(warmup)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_setup = time.perf_counter()
    trainer = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[timer])
    t_train = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    med = sorted(timer.times)[len(timer.times) // 2]
    # real (non-pad) tokens per step, averaged over the run: prompt + completion words + eos
    tokens = sum(len(r["prompt"].split()) + len(r["completion"].split()) + 1 for r in rows) / (steps + warmup)
    out = dict(impl="trl-" + __import__("trl").__version__, size=size, params=n_params, batch=batch, varlen=varlen, plen=plen,
               clen=clen, precompute_ref=precompute, liger=liger, grad_ckpt=gc, median_step_s=round(med, 4),
               tokens_per_s=round(tokens / med, 1), setup_s=round(t_train - t_setup, 2),
               train_s=round(t_end - t_train, 2), steps=len(timer.times),
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    print(json.dumps(out), flush=True)
    return out


def floor(size, batch, plen, clen, dtype, iters=10):
    """One policy forward+backward on the same tokens: the least any KTO step can cost."""
    cfg = Qwen2Config(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen2ForCausalLM(cfg).to(dtype).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, cfg.vocab_size, (batch, plen + clen), device=dev)
    times = []
    for i in range(iters + 3):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    print(json.dumps(dict(impl="floor-fwd-bwd-adamw", size=size, batch=batch, median_step_s=round(med, 4),
                          tokens_per_s=round(batch * (plen + clen) / med, 1))), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--plen", type=int, default=64)
    p.add_argument("--clen", type=int, default=64)
    p.add_argument("--modes", default="live,precompute,floor")
    p.add_argument("--gc", action="store_true")
    p.add_argument("--varlen", action="store_true")
    a = p.parse_args()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    for m in a.modes.split(","):
        try:
            if m == "floor":
                floor(a.size, a.batch, a.plen, a.clen, dtype)
            else:
                run(a.size, a.steps, a.batch, a.plen, a.clen, m in ("precompute", "liger"), a.warmup, dtype, a.gc, a.varlen, m == "liger")  # liger: precompute + Liger layer kernels
        except Exception as e:  # keep going: one failed mode must not cost the others
            print(json.dumps(dict(mode=m, error=repr(e)[:500])), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
