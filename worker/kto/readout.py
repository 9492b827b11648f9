"""Reading a step's metrics back without stopping the device (issue 4).

Logging a step's loss needs its value on the host. Reading it at the end of the step (``.item()``)
makes the host wait until the device has run the whole step, and the device then idles while the
host issues the first kernels of the next: on a GPU whose steps are bound by the host's kernel
launches, the two never overlap. Here each step's scalars are stacked into one tensor and copied
to pinned host memory asynchronously, and read ``lag`` steps later, by which time the device is
usually past them: the host issues step k+1 while the device finishes step k.

The same events time the device: ``device_step_s`` is the time between the ends of two steps on
the device's clock, what a step really costs once the host runs ahead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class StepReadout:
    """A queue of steps whose scalars are on their way to the host. ``submit`` after issuing a
    step; ``ready`` yields the steps at least ``lag`` behind; ``drain`` yields all (before a
    checkpoint, at the end). ``lag`` defaults to 1 on CUDA and 0 on the CPU, whose values are
    there at once (an explicit lag delays them there too, as the tests use it)."""

    def __init__(self, device: torch.device | str, n_values: int, lag: int | None = None):
        device = torch.device(device)
        self.cuda = device.type == "cuda"
        self.lag = lag if lag is not None else (1 if self.cuda else 0)
        self.n_values = n_values
        self._queue: deque[tuple[torch.Tensor, Any, dict[str, Any]]] = deque()
        self._last_end = None
        self._submitted = 0
        # one more buffer than can be in flight: a slot is read before it is written again
        self._buffers = ([torch.empty(n_values, dtype=torch.float32, pin_memory=True)
                          for _ in range(self.lag + 2)] if self.cuda else [])

    def submit(self, values: Sequence[torch.Tensor], meta: dict[str, Any]) -> None:
        """``values``: tensors on the step's device, flattened in order into ``n_values`` floats."""
        if self.cuda and len(self._queue) >= len(self._buffers):
            raise RuntimeError("read steps back (ready or drain) before submitting more")
        stacked = torch.cat([v.detach().float().reshape(-1) for v in values])
        if stacked.numel() != self.n_values:
            raise ValueError(f"expected {self.n_values} values, got {stacked.numel()}")
        if self.cuda:
            buf = self._buffers[self._submitted % len(self._buffers)]
            buf.copy_(stacked, non_blocking=True)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._queue.append((buf, end, meta))
        else:
            self._queue.append((stacked, None, meta))
        self._submitted += 1

    def ready(self) -> Iterator[tuple[list[float], dict[str, Any]]]:
        while len(self._queue) > self.lag:
            yield self._pop()

    def drain(self) -> Iterator[tuple[list[float], dict[str, Any]]]:
        while self._queue:
            yield self._pop()

    def __len__(self) -> int:
        return len(self._queue)

    def _pop(self) -> tuple[list[float], dict[str, Any]]:
        buf, end, meta = self._queue.popleft()
        if end is not None:
            end.synchronize()  # waits for this step's end only, not for the steps issued since
            if self._last_end is not None:
                meta = {**meta, "device_step_s": self._last_end.elapsed_time(end) / 1000.0}
            self._last_end = end
        return buf.tolist(), meta
