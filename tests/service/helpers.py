"""Small builders shared by the service tests."""

from __future__ import annotations

import itertools
from typing import Any

_counter = itertools.count()


def event(**overrides: Any) -> dict[str, Any]:
    """A valid event with a unique event_id; override any field."""
    n = next(_counter)
    base: dict[str, Any] = {
        "event_id": f"evt-{n}",
        "prompt": [{"role": "user", "content": f"What is {n} + 1?"}],
        "completion": f"It is {n + 1}.",
        "label": "up",
        "model_version": "m-2024-01",
        "user_id": "alice@example.com",
        "session_id": "s-1",
        "source": "web",
        "metadata": {"ui": "thumbs", "latency_ms": 120},
    }
    base.update(overrides)
    return base
