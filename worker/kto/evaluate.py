"""Held-out evaluation of a policy against its π_ref.

:func:`evaluate_policy` reports, on held-out feedback:

* the mean implied reward β·(log πθ(y|x) − log πref(y|x)) of desirable and of undesirable
  completions and their margin (what KTO optimises; it can rise while the task gets worse);
* a KL(πθ‖πref) estimate: mean over sampled prompts of log πθ(y|x) − log πref(y|x) with y
  sampled from πθ (a Monte-Carlo estimate of the sequence-level KL), and the z0-style
  mismatched-pairs estimate KTO itself uses;
* the mean length (tokens) of greedy generations of the policy vs π_ref on a sample of
  held-out prompts (the paper warns of length drift);
* optionally a task score: ``task_evaluator`` is a callable ``f(prompts, generations) -> float
  | dict`` or a dotted path ``"package.module:function"`` naming one (e.g.
  ``"worker.kto.toy:arithmetic_accuracy"``); it is given the policy's and π_ref's greedy
  generations on the same prompts.
"""

from __future__ import annotations

import contextlib
import importlib
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import GenerationConfig

from .data import FeedbackExample, Plan, as_examples, collate_microbatch, make_plan, tokenize_examples
from .logprobs import sequence_logps

TaskEvaluator = Callable[[Sequence, Sequence[str]], Any]


def load_callable(spec: str | Callable) -> Callable:
    """``"module.sub:function"`` (or ``module.sub.function``) -> the callable."""
    if callable(spec):
        return spec
    mod, sep, attr = spec.partition(":")
    if not sep:
        mod, _, attr = spec.rpartition(".")
    fn = importlib.import_module(mod)
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"{spec} is not callable")
    return fn


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt)["input_ids"])


#: generate() settings under which do_sample draws from the model's softmax unchanged
#: (transformers' global default is top_k=50)
_PLAIN_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
                   "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
#: What generate() still needs from a model's own generation config: its special tokens and
#: cache layout. Nothing that reshapes the distribution.
_KEPT_GENERATION_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                           "cache_implementation")


@contextlib.contextmanager
def _plain_generation_config(model):
    """Generate as the bare model: transformers fills every option a call leaves unset from the
    model's ``generation_config`` (suppressed or forced tokens, bad words, a minimum length,
    penalties), and each would bias the sampled-KL estimate (y must be drawn from πθ) and the
    length-drift comparison between two models whose shipped configs differ."""
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(owner, "generation_config", None)
    if saved is None:
        yield
        return
    kept = {k: getattr(saved, k) for k in _KEPT_GENERATION_FIELDS if getattr(saved, k, None) is not None}
    owner.generation_config = GenerationConfig(**kept)
    try:
        yield
    finally:
        owner.generation_config = saved


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence, max_new_tokens: int = 64, batch_size: int = 16,
    do_sample: bool = False, seed: int = 0, return_ids: bool = False,
):
    """Generations (text, special tokens skipped) for text prompts or message lists; greedy by
    default. Left-padded batches. ``return_ids=True`` also returns the new token ids."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts, all_ids = [], []
    gen = torch.Generator().manual_seed(seed)
    for s in range(0, len(prompts), batch_size):
        rows = [_prompt_ids(tokenizer, p) for p in prompts[s: s + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        if do_sample:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        with _plain_generation_config(model):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                **(_PLAIN_SAMPLING if do_sample else {"temperature": None, "top_p": None, "top_k": None}),
            )
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            while row and row[-1] == pad and pad != tokenizer.eos_token_id:
                row.pop()
            all_ids.append(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    if was_training:
        model.train()
    return (texts, all_ids) if return_ids else texts


@dataclass
class EvalReport:
    n_examples: int
    reward_desirable: float | None
    reward_undesirable: float | None
    margin: float | None
    kl_sampled: float | None  # mean log πθ(y|x) − log πref(y|x), y ~ πθ
    kl_mismatched: float | None  # KTO's z0 estimate (before the clamp) on held-out pairs
    gen_len_policy: float | None
    gen_len_reference: float | None
    task_policy: Any = None
    task_reference: Any = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _logps_over(model, data, plan: Plan, pad_id: int, batch_size: int, chunk_size: int, kl: bool,
                max_length: int | None = None):
    device = next(model.parameters()).device
    n = len(data)
    out, out_kl = torch.zeros(n), torch.zeros(n)
    order = list(range(n))
    for s in range(0, n, batch_size):
        idx = order[s: s + batch_size]
        b = collate_microbatch(data, idx, plan, pad_id, max_length)  # KL pairs cut as in training
        b = {k: v.to(device) for k, v in b.items()}
        out[idx] = sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"], chunk_size).float().cpu()
        if kl:
            out_kl[idx] = sequence_logps(
                model, b["kl_input_ids"], b["kl_attention_mask"], b["kl_completion_mask"], chunk_size
            ).float().cpu()
    return out, out_kl


def evaluate_policy(
    policy,
    reference,
    tokenizer,
    examples: Sequence[FeedbackExample | dict],
    beta: float = 0.1,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    batch_size: int = 16,
    n_generate: int = 32,
    max_new_tokens: int = 64,
    task_evaluator: str | TaskEvaluator | None = None,
    task_prompts: Sequence | None = None,
    seed: int = 0,
    chunk_size: int = 1024,
) -> EvalReport:
    """Evaluate ``policy`` against ``reference`` (both causal LMs; for a peft policy the
    reference may be the same object: pass ``reference="disable_adapter"``) on held-out
    ``examples``. ``task_prompts`` (default: a sample of the held-out prompts) are the prompts
    given to the task evaluator and used for the length comparison."""
    from contextlib import nullcontext

    examples = as_examples(examples)
    # cut as the job's training cut them (a prompt over max_prompt_length loses its beginning)
    data, stats = tokenize_examples(examples, tokenizer, max_length=max_length,
                                    max_prompt_length=max_prompt_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def ref_ctx():
        return policy.disable_adapter() if isinstance(reference, str) and reference == "disable_adapter" else nullcontext()

    ref_model = policy if isinstance(reference, str) else reference
    rep = dict(n_examples=len(data), reward_desirable=None, reward_undesirable=None, margin=None,
               kl_sampled=None, kl_mismatched=None, gen_len_policy=None, gen_len_reference=None)
    if len(data) >= 2:
        plan = make_plan(len(data), batch_size, seed=seed)
        p, pk = _logps_over(policy, data, plan, pad, batch_size, chunk_size, True, max_length)
        with ref_ctx():
            r, rk = _logps_over(ref_model, data, plan, pad, batch_size, chunk_size, True, max_length)
        rewards = beta * (p - r)
        d = torch.tensor([e.desirable for e in data])
        if d.any():
            rep["reward_desirable"] = float(rewards[d].mean())
        if (~d).any():
            rep["reward_undesirable"] = float(rewards[~d].mean())
        if d.any() and (~d).any():
            rep["margin"] = rep["reward_desirable"] - rep["reward_undesirable"]
        rep["kl_mismatched"] = float((pk - rk).mean())

    # prompts for generation: unique held-out prompts, seeded sample
    if task_prompts is None:
        seen, uniq = set(), []
        for e in examples:
            key = repr(e.prompt)
            if key not in seen:
                seen.add(key)
                uniq.append(e.prompt)
        random.Random(seed).shuffle(uniq)
        task_prompts = uniq[:n_generate]
    task_prompts = list(task_prompts)
    if task_prompts:
        gp, gp_ids = generate(policy, tokenizer, task_prompts, max_new_tokens, batch_size, return_ids=True)
        with ref_ctx():
            gr, gr_ids = generate(ref_model, tokenizer, task_prompts, max_new_tokens, batch_size, return_ids=True)
        rep["gen_len_policy"] = sum(map(len, gp_ids)) / len(gp_ids)
        rep["gen_len_reference"] = sum(map(len, gr_ids)) / len(gr_ids)
        # sampled-KL estimate on policy samples
        _, sp_ids = generate(policy, tokenizer, task_prompts, max_new_tokens, batch_size, do_sample=True,
                             seed=seed, return_ids=True)
        pairs = [(_prompt_ids(tokenizer, pr), ids) for pr, ids in zip(task_prompts, sp_ids) if ids]
        if pairs:
            from .data import TokenizedExample

            sdata = [TokenizedExample(pi, ci, True) for pi, ci in pairs]
            splan = Plan([list(range(len(sdata)))], [0] * len(sdata), seed)
            p_s, _ = _logps_over(policy, sdata, splan, pad, batch_size, chunk_size, False)
            with ref_ctx():
                r_s, _ = _logps_over(ref_model, sdata, splan, pad, batch_size, chunk_size, False)
            rep["kl_sampled"] = float((p_s - r_s).mean())
        if task_evaluator is not None:
            fn = load_callable(task_evaluator)
            rep["task_policy"] = fn(task_prompts, gp)
            rep["task_reference"] = fn(task_prompts, gr)
    return EvalReport(**rep, extra={"tokenize": stats.as_dict()})
