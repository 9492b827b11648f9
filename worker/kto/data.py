"""Feedback events -> token ids -> microbatches with mismatched KL pairs.

Tokenisation follows TRL's KTOTrainer: a text prompt is tokenised alone and with the
completion (+ EOS) appended; a message-list prompt goes through the tokenizer's chat template
(with ``add_generation_prompt`` for the prompt alone, and the completion as an assistant
message for the whole); the completion is whatever follows the common prefix. The loss only
sees completion tokens.

Truncation (``max_length``): the END of the prompt and the START of the completion are kept.
A prompt longer than ``max_prompt_length`` (default ``max_length // 2``) loses its beginning; if
prompt + completion is still too long, the completion loses its end. An example left with no
prompt or no completion token is dropped. :class:`TokenizeStats` counts both.

KL pairs (the z0 reference point): the microbatches are fixed once, from a seeded permutation,
and each example i gets one partner j != i whose completion it is scored with, log π(y_j|x_i):

* inside a microbatch of m >= 2 examples, completions rotate by one (as TRL): member k takes
  member k-1's completion (member 0 takes the last one's);
* a microbatch of one example (``microbatch_size=1``, or a remainder of one) takes a seeded
  partner drawn from the rest of the dataset (fixed for the run). TRL refuses batch size 1.

Pairs are fixed before reference log-probs are precomputed, and never change afterwards;
between epochs only the ORDER of the microbatches is shuffled (seed + epoch), so membership,
pairs and the precomputed reference values stay valid while the data is still shuffled.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class FeedbackExample:
    prompt: str | Messages
    completion: str
    desirable: bool


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    source_index: int = -1  # position in the input list


@dataclass
class TokenizeStats:
    n_input: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_desirable: int = 0
    n_undesirable: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _parse_label(row: dict[str, Any]) -> bool:
    for key in ("label", "desirable"):
        if key in row:
            v = row[key]
            if isinstance(v, bool):
                return v
            if isinstance(v, (int, float)) and v in (0, 1):
                return bool(v)
            if isinstance(v, str) and v.strip().lower() in ("true", "1", "yes", "up", "desirable"):
                return True
            if isinstance(v, str) and v.strip().lower() in ("false", "0", "no", "down", "undesirable"):
                return False
            raise ValueError(f"unreadable label {v!r}")
    raise ValueError("row has neither 'label' nor 'desirable'")


def example_from_dict(row: dict[str, Any]) -> FeedbackExample:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(completion, list):  # TRL conversational: [{"role": "assistant", "content": ...}]
        completion = "".join(m["content"] for m in completion)
    if not isinstance(prompt, (str, list)) or not isinstance(completion, str):
        raise ValueError("prompt must be a string or a list of messages, completion a string")
    return FeedbackExample(prompt=prompt, completion=completion, desirable=_parse_label(row))


def read_jsonl(path: str | Path) -> list[FeedbackExample]:
    """Rows ``{"prompt", "completion", "label"}`` (TRL's unpaired format; ``"desirable"`` is
    accepted instead of ``"label"``). Blank lines are skipped; a bad row raises with its line."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise TypeError(f"expected a JSON object, got {type(row).__name__}")
                out.append(example_from_dict(row))
            except KeyError as e:  # str(KeyError) is just the quoted key
                raise ValueError(f"{path}:{n}: missing {e}") from e
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{n}: {e}") from e
    return out


def as_examples(items: Iterable[FeedbackExample | dict]) -> list[FeedbackExample]:
    return [x if isinstance(x, FeedbackExample) else example_from_dict(x) for x in items]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_example(ex: FeedbackExample, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) exactly as TRL 1.16 builds them."""
    if isinstance(ex.prompt, list):
        prompt_ids = tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        full_ids = tokenizer.apply_chat_template(
            ex.prompt + [{"role": "assistant", "content": ex.completion}], tokenize=True, return_dict=False
        )
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
            prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    else:
        completion = ex.completion
        eos = tokenizer.eos_token
        if eos and not completion.endswith(eos):
            completion = completion + eos
        prompt_ids = tokenizer(ex.prompt)["input_ids"]
        full_ids = tokenizer(ex.prompt + completion)["input_ids"]
    n = _common_prefix(prompt_ids, full_ids)
    return list(full_ids[:n]), list(full_ids[n:])


def tokenize_examples(
    examples: Sequence[FeedbackExample | dict],
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> tuple[list[TokenizedExample], TokenizeStats]:
    examples = as_examples(examples)
    stats = TokenizeStats(n_input=len(examples))
    if max_length is not None and max_prompt_length is None:
        max_prompt_length = max(1, max_length // 2)
    out: list[TokenizedExample] = []
    for i, ex in enumerate(examples):
        p, c = tokenize_example(ex, tokenizer)
        p, c, truncated = truncate(p, c, max_length, max_prompt_length)
        if not c or not p:
            stats.n_dropped += 1
            continue
        stats.n_truncated += truncated
        out.append(TokenizedExample(p, c, bool(ex.desirable), i))
    stats.n_kept = len(out)
    stats.n_desirable = sum(e.desirable for e in out)
    stats.n_undesirable = stats.n_kept - stats.n_desirable
    return out, stats


def truncate(prompt: list[int], completion: list[int], max_length: int | None, max_prompt_length: int | None):
    """Keep the end of the prompt and the start of the completion. Returns (p, c, truncated)."""
    if max_length is None or len(prompt) + len(completion) <= max_length:
        return prompt, completion, False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
    if len(prompt) + len(completion) > max_length:
        completion = completion[: max(0, max_length - len(prompt))]
    return prompt, completion, True


# --------------------------------------------------------------------------- KL pairing

@dataclass
class Plan:
    """Fixed microbatches and KL partners. ``partner[i]`` is j != i: example i is scored with
    completion j for the KL estimate."""

    microbatches: list[list[int]]
    partner: list[int]
    seed: int

    def epoch_order(self, epoch: int) -> list[int]:
        """The order in which microbatches are visited in ``epoch`` (seeded shuffle)."""
        order = list(range(len(self.microbatches)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order


def make_plan(n: int, microbatch_size: int, seed: int = 0, shuffle: bool = True) -> Plan:
    """Fix microbatch membership (from a seeded permutation, or in order with
    ``shuffle=False`` as TRL's sequential sampler) and each example's KL partner."""
    if n < 2:
        raise ValueError("KTO's KL estimate needs at least 2 examples")
    if microbatch_size < 1:
        raise ValueError("microbatch_size must be >= 1")
    rng = random.Random(seed)
    idx = list(range(n))
    if shuffle:
        rng.shuffle(idx)
    mbs = [idx[k: k + microbatch_size] for k in range(0, n, microbatch_size)]
    partner = [-1] * n
    for mb in mbs:
        if len(mb) >= 2:
            for k, i in enumerate(mb):
                partner[i] = mb[k - 1]  # rotate by one, as TRL: member 0 takes the last
        else:
            i = mb[0]
            j = rng.randrange(n - 1)
            partner[i] = j if j < i else j + 1
    return Plan(mbs, partner, seed)


# --------------------------------------------------------------------------- collation

def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_sequences(pairs: list[tuple[list[int], list[int]]], pad_id: int, max_length: int | None = None) -> dict:
    """Right-padded input_ids / attention_mask / completion_mask for (prompt, completion) pairs."""
    ids, cmask = [], []
    for p, c in pairs:
        full, m = p + c, [0] * len(p) + [1] * len(c)
        if max_length is not None:
            full, m = full[:max_length], m[:max_length]
        ids.append(full)
        cmask.append(m)
    return {
        "input_ids": _pad(ids, pad_id),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "completion_mask": _pad(cmask, 0),
    }


def collate_microbatch(
    data: Sequence[TokenizedExample], indices: Sequence[int], plan: Plan, pad_id: int, max_length: int | None = None
) -> dict:
    """Policy sequences (x_i, y_i) and KL sequences (x_i, y_partner(i)) for one microbatch."""
    main = collate_sequences([(data[i].prompt_ids, data[i].completion_ids) for i in indices], pad_id, max_length)
    kl = collate_sequences(
        [(data[i].prompt_ids, data[plan.partner[i]].completion_ids) for i in indices], pad_id, max_length
    )
    out = dict(main)
    out.update({f"kl_{k}": v for k, v in kl.items()})
    out["desirable"] = torch.tensor([data[i].desirable for i in indices], dtype=torch.bool)
    out["index"] = torch.tensor(list(indices), dtype=torch.long)
    return out
