"""The demo's simulated world: a product that serves whichever version `/v1/serve` names, and
users who give a thumbs-up to right answers and a thumbs-down otherwise, with some noise.

Answers are sampled (temperature 1), as a product would, so the feedback carries both right
and wrong answers of each version; thumbs go through the real HTTP API.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from worker.kto import toy
from worker.kto.evaluate import generate


@dataclass
class VersionTally:
    n: int = 0
    up: int = 0

    @property
    def rate(self) -> float | None:
        return self.up / self.n if self.n else None


@dataclass
class Traffic:
    events: int = 0
    by_version: dict[str, VersionTally] = field(default_factory=lambda: defaultdict(VersionTally))
    by_arm: dict[str, VersionTally] = field(default_factory=lambda: defaultdict(VersionTally))


class Models:
    """Loaded models by folder (a version's weights never change once registered)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, Any] = {}

    def get(self, path: str) -> Any:
        if path not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[path] = AutoModelForCausalLM.from_pretrained(path).eval()
        return self._cache[path]

    def accuracy(self, path: str) -> float:
        """Greedy task accuracy over every prompt of the task: the number the loop must raise."""
        return toy.task_accuracy(self.get(path), self.tokenizer)


class World:
    def __init__(self, models: Models, n_users: int = 60, noise: float = 0.05, seed: int = 0):
        self.models = models
        self.n_users = n_users
        self.noise = noise
        self.rng = random.Random(seed)
        self.prompts = toy.arithmetic_prompts()
        self._n = 0
        self._gen_seed = seed * 1000

    def user_likes(self, prompt: str, completion: str) -> bool:
        right = toy.arithmetic_accuracy([prompt], [completion]) == 1.0
        return (not right) if self.rng.random() < self.noise else right

    def traffic(self, ingest: httpx.Client, n_requests: int, tag: str,
                batch: int = 50) -> Traffic:
        """Serve ``n_requests`` requests: ask /v1/serve per user, answer with that version,
        post the users' thumbs in batches."""
        out = Traffic()
        for start in range(0, n_requests, batch):
            asks = []
            for _ in range(min(batch, n_requests - start)):
                user = f"user-{self.rng.randrange(self.n_users)}"
                r = ingest.post("/v1/serve", json={}, headers={"X-User-Id": user})
                r.raise_for_status()
                asks.append((user, self.rng.choice(self.prompts), r.json()))
            groups: dict[str, list[int]] = defaultdict(list)
            for i, (_, _, serve) in enumerate(asks):
                groups[serve["model_path"]].append(i)
            answers: dict[int, str] = {}
            for path, idx in groups.items():
                self._gen_seed += 1
                with torch.no_grad():
                    texts = generate(self.models.get(path), self.models.tokenizer,
                                     [asks[i][1] for i in idx], max_new_tokens=4,
                                     batch_size=64, do_sample=True, seed=self._gen_seed)
                answers.update(zip(idx, texts))
            events = []
            for i, (user, prompt, serve) in enumerate(asks):
                self._n += 1
                up = self.user_likes(prompt, answers[i])
                events.append({"event_id": f"{tag}-{self._n}", "prompt": prompt,
                               "completion": answers[i], "label": "up" if up else "down",
                               "model_version": serve["model_version"], "user_id": user,
                               "source": "demo"})
                for tally in (out.by_version[serve["model_version"]], out.by_arm[serve["arm"]]):
                    tally.n += 1
                    tally.up += up
            r = ingest.post("/v1/feedback/batch", json={"events": events})
            r.raise_for_status()
            out.events += len(events)
        return out
