"""A whole KTO optimizer step replayed as one CUDA graph, for pack shapes that repeat (issue 4).

Why: a step of a small model launches some ten thousand kernels (24 layers, forward, backward,
the KL forward, the chunked LM head, clipping, AdamW), and the host spends tens of
microseconds on each (Python, the dispatcher, autograd, the launch). At 0.5B the GPU then waits
for the host: one step of 4,096 tokens took as long as one of 16,384 on an H100 for both
Prospect and TRL (docs/benchmarks.md). A CUDA graph launches the step's recorded kernels in one
call, so the step takes the device's time only.

What it needs, and checks (``resolve_cuda_graphs``): CUDA, packed microbatches with the varlen
attention kernel (the other backends build masks from Python lists), one process, one
microbatch per step, precomputed reference log-probs, no gradient checkpointing, no
``compile_layers``. A graph replays only the exact shapes it was recorded with, so it pays where
shapes repeat: fixed-length data, or packs padded to a few lengths. Each new shape runs eagerly
twice (warming Triton, compiled kernels and cuBLAS up, the second time on the capture stream),
is captured the third time and replayed from then on; at most ``max_graphs`` shapes are kept.
Any capture failure logs a warning and leaves the rest of the run eager.

Numbers: the replay runs the very kernels of the eager step on the same inputs, so the
trajectory is the eager one (a CUDA test holds them together).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any, Callable, Iterator

import torch

from .packing import last_backends, pack_to

log = logging.getLogger(__name__)

#: Pack fields that are counts for the logs, not shapes the kernels see.
_NOT_SHAPE = frozenset({"n_tokens", "kl_tokens", "n_real"})
#: Eager runs of a shape before it is captured (the last of them on the capture stream).
EAGER_RUNS = 2


def graph_signature(pack: dict[str, Any]) -> tuple:
    """What must be equal for a recorded step to be replayed on ``pack``: every tensor's shape
    and dtype, and the Python values the kernels are launched with (longest sequences, counts,
    flags). Values inside tensors may differ: they are copied into the graph's inputs."""
    parts: list[tuple] = []
    for key in sorted(pack):
        v = pack[key]
        if isinstance(v, torch.Tensor):
            parts.append((key, tuple(v.shape), v.dtype))
        elif isinstance(v, (list, tuple)):
            parts.append((key, len(v)))
        elif key not in _NOT_SHAPE:
            parts.append((key, v))
    return tuple(parts)


class StepGraphs:
    """Counts pack shapes, captures a step for a shape seen ``EAGER_RUNS`` times, replays it.

    ``step_fn(batch)`` is the whole device step on a batch of device tensors: forward, loss,
    backward, clipping and the optimizer step; it returns the tensors the caller reads
    afterwards (loss, metrics). The optimizer's learning rate becomes a device tensor that
    :meth:`set_lr` fills before every step, eager or replayed, so the schedule goes on in the
    graph.
    """

    def __init__(self, step_fn: Callable[[dict[str, Any]], tuple[torch.Tensor, ...]],
                 optimizer: torch.optim.Optimizer, device: torch.device, max_graphs: int = 2):
        self.step_fn = step_fn
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.max_graphs = max_graphs
        self.seen: Counter = Counter()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Any], tuple[torch.Tensor, ...]]] = {}
        self.failed = False
        self.replays = 0
        self.stream = torch.cuda.Stream(device=self.device)
        self.lr = torch.zeros((), dtype=torch.float32, device=self.device)
        for group in optimizer.param_groups:
            group["lr"] = self.lr
            group["capturable"] = True

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)
        for group in self.optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):  # a scheduler that assigns floats
                group["lr"] = lr

    def _eligible(self) -> bool:
        return not self.failed and set(last_backends().values()) <= {"varlen", "varlen_repeat"}

    @contextlib.contextmanager
    def eager(self, host: dict[str, Any]) -> Iterator[None]:
        """Around an eager step on ``host``: counts its shape; the run before the capture goes
        on the capture stream, so that what is set up lazily per stream exists when capturing."""
        sig = graph_signature(host)
        self.seen[sig] += 1
        if self.seen[sig] == EAGER_RUNS and sig not in self.graphs and len(self.graphs) < self.max_graphs:
            torch.cuda.synchronize(self.device)
            with torch.cuda.stream(self.stream):
                yield
            torch.cuda.synchronize(self.device)
        else:
            yield

    def replay(self, host: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
        """Run the step on ``host`` from a graph (capturing it first when its shape is due);
        None: run it eagerly (inside :meth:`eager`)."""
        sig = graph_signature(host)
        if sig not in self.graphs:
            if self.seen[sig] < EAGER_RUNS or len(self.graphs) >= self.max_graphs or not self._eligible():
                return None
            if not self._capture(sig, host):
                return None
        graph, static, outs = self.graphs[sig]
        for key, v in host.items():
            if isinstance(v, torch.Tensor):
                static[key].copy_(v.pin_memory(), non_blocking=True)
        graph.replay()
        self.replays += 1
        return outs

    def _capture(self, sig: tuple, host: dict[str, Any]) -> bool:
        static = pack_to(host, self.device)
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates its own
        for group in self.optimizer.param_groups:  # the graph must read the rate from the tensor, not bake a float
            group["lr"] = self.lr
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                outs = self.step_fn(static)
        except Exception as e:  # an op that cannot be captured here: eager for the rest of the run
            self.failed = True
            self.optimizer.zero_grad(set_to_none=True)  # never computed: recorded only
            torch.cuda.synchronize(self.device)
            log.warning("CUDA graph capture failed (%s); training goes on without graphs", repr(e)[:300])
            return False
        self.graphs[sig] = (graph, static, tuple(o.detach() for o in outs))
        log.info("captured the training step as a CUDA graph (shape %d of at most %d)", len(self.graphs),
                 self.max_graphs)
        return True
