"""A tiny tokenizer, model and task made locally, for tests and the demo (no hub access).

* :func:`make_tokenizer` builds a character-level tokenizer with the ``tokenizers`` library and
  wraps it as a :class:`~transformers.PreTrainedTokenizerFast` with a ChatML-style chat template.
* :func:`make_model` builds a Llama-shaped causal LM from a config (a few hundred thousand
  parameters), so every code path the engine runs on real models runs here on a CPU.
* The arithmetic task: prompts ``"3+4="``, the right answer ``"7"``. :func:`sft_base_model`
  trains a base model that is right only part of the time (it learns a mix of right answers
  and the non-answer "?"), :func:`make_feedback` makes thumbs-style feedback on that task with any
  desirable:undesirable ratio, and :func:`arithmetic_accuracy` is a task evaluator that scores
  generations (usable as the dotted-path hook ``"worker.kto.toy:arithmetic_accuracy"``).
* :func:`make_toy_folder` writes model + tokenizer as a Hugging Face folder.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, IM_START, UNK = "<pad>", "<|im_end|>", "<|im_start|>", "<unk>"
CHARS = list("0123456789+-*=?:,.!' \n") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer (vocab ~45) with pad/eos and a chat template."""
    vocab = {t: i for i, t in enumerate([PAD, EOS, IM_START, UNK] + CHARS)}
    # A BPE model with no merges splits a string into its characters; no pre-tokenizer keeps
    # spaces and newlines as ordinary characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens([PAD, EOS, IM_START, UNK])
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def make_model(
    tokenizer: PreTrainedTokenizerFast | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> LlamaForCausalLM:
    tokenizer = tokenizer or make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def save_folder(model, tokenizer, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_toy_folder(path: str | Path, seed: int = 0, **model_kwargs) -> Path:
    """Write an untrained toy model + tokenizer as a Hugging Face folder."""
    tok = make_tokenizer()
    return save_folder(make_model(tok, seed=seed, **model_kwargs), tok, path)


# --------------------------------------------------------------------------- the task

def arithmetic_prompts(max_operand: int = 9) -> list[str]:
    return [f"{a}+{b}=" for a in range(max_operand + 1) for b in range(max_operand + 1)]


def answer(prompt: str) -> str:
    a, b = re.match(r"\s*(\d+)\+(\d+)=", prompt).groups()
    return str(int(a) + int(b))


def wrong_answer(prompt: str) -> str:
    """The base model's typical mistake: the non-answer "?"."""
    return "?"


def arithmetic_accuracy(prompts: Sequence, generations: Sequence[str]) -> float:
    """Task evaluator: fraction of generations whose first number is the right sum."""
    ok = 0
    for p, g in zip(prompts, generations):
        text = p if isinstance(p, str) else p[-1]["content"]
        m = re.match(r"\s*(\d+)", g)
        ok += bool(m and m.group(1) == answer(text))
    return ok / max(1, len(prompts))


def sft_base_model(
    model,
    tokenizer,
    p_correct: float = 0.4,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    max_operand: int = 9,
):
    """SFT ``model`` (in place) on the task where the target is right with probability
    ``p_correct`` and the non-answer "?" otherwise: its greedy answers are then right only part of the
    time, while the right answer keeps a good share of probability (what KTO can exploit)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    prompts = arithmetic_prompts(max_operand)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos = tokenizer.eos_token
    model.train()
    for _ in range(steps):
        texts, plens = [], []
        for _ in range(batch_size):
            p = rng.choice(prompts)
            c = answer(p) if rng.random() < p_correct else wrong_answer(p)
            texts.append(p + c + eos)
            plens.append(len(tokenizer(p, add_special_tokens=False)["input_ids"]))
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for i, n in enumerate(plens):
            labels[i, :n] = -100
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def make_feedback(
    n: int,
    desirable_fraction: float = 0.5,
    seed: int = 0,
    max_operand: int = 9,
    chat: bool = False,
) -> list[dict]:
    """Thumbs-style feedback rows ``{prompt, completion, label}`` on the task: desirable rows
    carry the right answer, undesirable rows a wrong one (mostly the base model's mistake
    "?", sometimes a wrong number). ``chat=True`` gives prompts as message lists."""
    rng = random.Random(seed)
    prompts = arithmetic_prompts(max_operand)
    rows = []
    for _ in range(n):
        p = rng.choice(prompts)
        good = rng.random() < desirable_fraction
        if good:
            c = answer(p)
        elif rng.random() < 0.8:
            c = wrong_answer(p)
        else:
            c = str(int(answer(p)) + rng.choice([-2, -1, 2, 3]))
        prompt = [{"role": "user", "content": p}] if chat else p
        rows.append({"prompt": prompt, "completion": c, "label": good})
    return rows


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence, max_new_tokens: int = 4, batch_size: int = 64) -> list[str]:
    """Greedy generations (text prompts, or message lists through the chat template)."""
    from .evaluate import generate

    return generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size)


def task_accuracy(model, tokenizer, prompts: Sequence | None = None) -> float:
    prompts = list(prompts or arithmetic_prompts())
    return arithmetic_accuracy(prompts, greedy_generate(model, tokenizer, prompts))
