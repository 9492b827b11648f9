"""A whole KTO optimizer step replayed as one CUDA graph, for pack shapes that repeat (issue 4).

Why: a step of a small model launches some ten thousand kernels (24 layers, forward, backward,
the KL forward, the chunked LM head, clipping, AdamW), and the host spends tens of
microseconds on each (Python, the dispatcher, autograd, the launch). At 0.5B the GPU then waits
for the host: one step of 4,096 tokens took as long as one of 16,384 on an H100 for both
Prospect and TRL (docs/benchmarks.md). A CUDA graph launches the step's recorded kernels in one
call, so the step takes the device's time only.

What it needs, and checks (``resolve_cuda_graphs`` in the trainer): CUDA, packed microbatches
with the varlen attention kernel (the other paths slice by Python lists), one process, one
microbatch per step, precomputed reference log-probs, the fused LM head, no gradient
checkpointing, no ``compile_layers``. A graph replays only the exact shapes it was recorded
with, so it pays where shapes repeat: fixed-length data, or packs padded to a few lengths
(``pack_bucket``, ``worker.kto.packing.bucket_pack``).

The first step runs eagerly through the trainer's own path (compiles, Triton kernels, one-off
probes that read values back happen here). From the second on, the first step whose shape is
worth a graph (``worth_capturing``) runs eagerly through the graph's step function on the
capture stream with host syncs made errors (``torch.cuda.set_sync_debug_mode("error")``): a
sync would break a capture, so it is found here, where the step can still be redone eagerly.
From then on a shape worth it is captured (at once with bucketed packs, whose sizes also keep
Triton's and the compiled LM head's specialisations, so nothing compiles then; otherwise the
second time it comes, and with ``min_share`` only a shape that makes that share of the steps)
and replayed every later time. Until the rehearsal the optimizer is left as it is.

The caller runs every step, the eager ones too, on :attr:`StepGraphs.stream`: autograd nodes
keep the stream they were made on, and a backward captured on another stream than its warm-up
steps fails on the legacy stream (``cudaErrorStreamCaptureImplicit``).

All graphs share one memory pool (their replays never overlap, and what they return is read
before the next replay), so memory grows little with the number of shapes; at most
``max_graphs`` are kept, steps of other shapes run eagerly. A failed rehearsal or capture
logs why and leaves the run eager.

Numbers: the replay runs the very kernels of the eager step on the same inputs, so the
trajectory is the eager one (a CUDA test holds them together).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable

import torch

from .packing import last_backends, pack_to

log = logging.getLogger(__name__)

#: Pack fields that are counts for the logs, not shapes the kernels see.
_NOT_SHAPE = frozenset({"n_tokens", "kl_tokens", "n_real", "repeat"})
#: Steps before the first capture: the trainer's eager path, then the sync-free rehearsal.
EAGER_RUNS = 2
#: Captured shapes that never came back, after which new shapes wait for their second time.
MAX_UNUSED = 8
#: Attention paths whose kernels read everything from tensors (no Python lists per pack).
_GRAPH_SAFE_BACKENDS = {"varlen", "varlen_repeat"}


def worth_capturing(count: int, steps: int, expect_repeats: bool, unused: int, min_share: float = 0.0) -> bool:
    """Whether a step shape seen ``count`` times in ``steps`` steps (this one included) is
    recorded now. Bucketed packs (``expect_repeats``): at first sight, until ``MAX_UNUSED``
    captured shapes never came back. Otherwise from its second time, and only where it makes at
    least ``min_share`` of the steps so far: with ``cuda_graphs="auto"`` variable-length packs,
    whose shapes come back once an epoch at best, never pay for a capture and its memory."""
    if expect_repeats and unused < MAX_UNUSED:
        return True
    return count > 1 and count >= min_share * steps


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
    """Counts pack shapes, rehearses and captures a step for a shape that comes back, replays it.

    ``step_fn(batch)`` is the whole device step on a batch of device tensors: forward, loss,
    backward, clipping and the optimizer step; it returns the tensors the caller reads
    afterwards (loss, metrics). From the rehearsal on, the optimizer's learning rate is a device
    tensor that :meth:`set_lr` fills before every step, eager or replayed, so the schedule goes
    on in the graph, and the optimizer is ``capturable`` (its step counters on the device).
    """

    def __init__(self, step_fn: Callable[[dict[str, Any]], tuple[torch.Tensor, ...]],
                 optimizer: torch.optim.Optimizer, device: torch.device, max_graphs: int = 2,
                 expect_repeats: bool = False, min_share: float = 0.0):
        self.step_fn = step_fn
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.max_graphs = max_graphs
        #: bucketed packs: every shape is likely to come back, so capture it the first time
        self.expect_repeats = expect_repeats
        #: a shape is captured only where it makes this share of the steps so far (worth_capturing)
        self.min_share = min_share
        self.warmups = 0
        self.rehearsed = False
        self.uses: Counter = Counter()  # replays per captured shape, the capturing step not counted
        self._failed_graphs: list[torch.cuda.CUDAGraph] = []
        #: how the latest step ran: eager | rehearsal | capture (recorded, then replayed) | replay
        self.mode = "eager"
        self.seen: Counter = Counter()  # steps per shape
        self.steps = 0
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Any], tuple[torch.Tensor, ...]]] = {}
        self.failed = False
        self.stream = torch.cuda.Stream(device=self.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.lr = torch.zeros((), dtype=torch.float32, device=self.device)

    def _arm(self) -> None:
        """The optimizer as a graph needs it, from the rehearsal on (a run whose shapes never pay
        for a capture keeps its optimizer as it was): the learning rate read from a device tensor,
        ``capturable`` step counters on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
            group["capturable"] = True
            for p in group["params"]:  # a non-fused optimizer keeps its step counters on the CPU
                st = self.optimizer.state.get(p, {})
                if isinstance(st.get("step"), torch.Tensor) and st["step"].device != p.device:
                    st["step"] = st["step"].to(p.device)

    @property
    def captures(self) -> int:
        return len(self.graphs)

    @property
    def replays(self) -> int:
        """Steps run from a graph recorded earlier (a capturing step not counted)."""
        return sum(self.uses.values())

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)
        for group in self.optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):  # a scheduler that assigns floats
                group["lr"] = lr

    def run(self, host: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
        """The step on ``host`` (a CPU pack) from a graph, or through the rehearsal; None: the
        caller runs it on its eager path."""
        sig = graph_signature(host)
        self.seen[sig] += 1
        self.steps += 1
        self.mode = "eager"
        if sig in self.graphs:
            self.mode = "replay"
            self.uses[sig] += 1
            return self._replay(sig, host)
        if (self.failed or len(self.graphs) >= self.max_graphs
                or not set(last_backends().values()) <= _GRAPH_SAFE_BACKENDS):
            return None
        self.warmups += 1
        if self.warmups < EAGER_RUNS:
            return None  # the trainer's own eager path, whatever the shape
        unused = sum(1 for k in self.graphs if not self.uses[k])
        if not worth_capturing(self.seen[sig], self.steps, self.expect_repeats, unused, self.min_share):
            return None
        if not self.rehearsed:  # the first shape worth a graph is rehearsed, the next one captured
            outs = self._rehearse(host)
            self.mode = "rehearsal" if outs is not None else "eager"
            return outs
        if self._capture(sig, host):
            self.mode = "capture"
            return self._replay(sig, host)
        return None

    def _fail(self, what: str, e: BaseException) -> None:
        self.failed = True
        self.optimizer.zero_grad(set_to_none=True)  # never applied: the step is redone eagerly
        cause = e.__context__ or e  # a failed capture raises again when it is closed; the first error says why
        log.warning("CUDA graph %s failed (%s); training goes on without graphs", what, repr(cause)[:400],
                    exc_info=cause)  # once a run: the frame that broke the capture is what to fix

    def _rehearse(self, host: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
        """Run the step eagerly through ``step_fn`` on the capture stream with host syncs made
        errors: whatever would break the capture shows here, where the step can be redone."""
        self._arm()
        batch = pack_to(host, self.device)
        torch.cuda.synchronize(self.device)
        mode = torch.cuda.get_sync_debug_mode()
        try:
            with torch.cuda.stream(self.stream):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    outs = self.step_fn(batch)
                finally:
                    torch.cuda.set_sync_debug_mode(mode)
        except Exception as e:
            torch.cuda.synchronize(self.device)
            self._fail("rehearsal (a host sync inside the step?)", e)
            return None
        torch.cuda.synchronize(self.device)
        self.rehearsed = True
        return tuple(o.detach() for o in outs)

    def _capture(self, sig: tuple, host: dict[str, Any]) -> bool:
        static = pack_to(host, self.device)
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates its own
        for group in self.optimizer.param_groups:  # the graph must read the rate from the tensor, not bake a float
            group["lr"] = self.lr
        prev = torch.cuda.current_stream(self.device)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                outs = self.step_fn(static)
        except Exception as e:
            # torch.cuda.graph's exit raised before restoring the stream and, where the capture
            # itself failed, before routing allocations back out of the pool. The pool is shared
            # with the graphs already captured, so it is not released; the failed graph is kept
            # so that its destructor cannot release it either.
            torch.cuda.set_stream(prev)
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            try:
                torch._C._cuda_endAllocateToPool(index, self.pool)
            except Exception:  # already routed back (the capture itself ended), or a torch without it
                pass
            self._failed_graphs.append(graph)
            torch.cuda.synchronize(self.device)
            self._fail("capture", e)
            return False
        self.graphs[sig] = (graph, static, tuple(o.detach() for o in outs))
        log.info("captured the training step as a CUDA graph (shape %d of at most %d)", len(self.graphs),
                 self.max_graphs)
        return True

    def _replay(self, sig: tuple, host: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        graph, static, outs = self.graphs[sig]
        for key, v in host.items():
            if isinstance(v, torch.Tensor):
                static[key].copy_(v.pin_memory(), non_blocking=True)
        graph.replay()
        return outs
