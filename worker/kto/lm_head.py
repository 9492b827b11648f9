"""Per-token log-probs through the LM head, chunked, with a hand-written backward.

Why not autograd with activation checkpointing (the first version): the recompute then runs the
chunk's whole forward graph again, and autograd's backward of ``logits.float()``,
``logsumexp`` and ``gather`` writes several more ``[chunk, V]`` float32 tensors (the softmax,
a zero-filled scatter for the gather, their sum, the cast back). With V = 151,936 those
memory passes cost as much as a good part of the LM head's matrix products. Here the forward
keeps only the log-sum-exp per row; the backward recomputes the chunk's logits once and turns
them in place into ``g·(onehot - softmax)``, cast to the compute dtype on the way.

Precision: on CUDA the projection writes float32 logits straight from the bf16/fp16 product
(``torch.mm(..., out_dtype=float32)``) instead of rounding them to bf16 first, and the weight
gradient is accumulated over chunks in float32 (``addmm`` with a float32 output), so the
result does not drift with the number of chunks. Elsewhere (CPU) the same ops run in the
inputs' dtype, float32 at least.

Where torch lacks ``out_dtype`` for these products, the logits and each chunk's weight
gradient are rounded to the inputs' dtype instead (with a warning).

On CUDA the two passes over each chunk's logits (log-sum-exp + target in the forward, the
gradient in the backward) are ``torch.compile``'d into one kernel each (``compiled=True``):
eager torch spends several full-size temporaries on them, one read is enough. A compile
failure falls back to eager ops for the rest of the process.

Keeping the logits' gradient (``keep_grads``): ``d logp/d logits = onehot − softmax`` does not
depend on the loss, so the forward can write it (in the compute dtype) while the logits are
still there, and the backward then only scales rows and runs the two gradient products: one
product of the LM head's four (forward, recompute, two gradients) and the recomputed logits'
memory passes are saved, for ``rows × V`` compute-dtype elements kept from forward to
backward. :func:`chunked_token_logps` keeps them when they fit its ``grad_cache_bytes``.
The chunks write into one ``[rows, V]`` buffer, so each gradient is one product over all rows:
the weight gradient is written once, where chunk by chunk its float32 accumulator
(``V × H × 4`` bytes) is read and written again for every chunk, and the hidden rows' product
gets all rows' tiles to spread over the GPU instead of one chunk's. Over the budget, the
backward recomputes the chunks' gradients into a buffer of up to ``grad_cache_bytes`` and runs
the products once per such group of chunks, for the same reason.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)
_OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

#: default budget for the kept logits' gradient: 2.3 GiB at fixed-b32 (8,192 completion rows ×
#: Qwen2.5's 151,936-token vocabulary in bf16); larger batches recompute in the backward instead
DEFAULT_GRAD_CACHE_GIB = 4.0

_MM_FP32: dict[tuple[str, str, torch.dtype], bool] = {}


def _fp32_out_ok(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm`` (``op="mm"``) or ``torch.addmm`` into a float32 accumulator
    (``op="addmm"``) takes ``out_dtype=float32`` for half inputs here (CUDA, recent torch);
    probed once per op, device type and dtype, each on its own since builds differ."""
    key = (op, device.type, dtype)
    if key not in _MM_FP32:
        ok = False
        if dtype in (torch.float16, torch.bfloat16) and device.type == "cuda":
            if _graph_sensitive():  # the probe reads its result back: a sync, fatal to a capture
                raise RuntimeError(f"the LM head's torch.{op} probe must run outside a CUDA-graph capture "
                                   "(ChunkedLMHeadLogps.forward runs both on its first eager call)")
            a = torch.ones(2, 2, dtype=dtype, device=device)
            try:
                if op == "mm":
                    out = torch.mm(a, a, out_dtype=torch.float32)
                    ok = out.dtype == torch.float32 and float(out[0, 0]) == 2.0
                else:
                    acc = torch.ones(2, 2, dtype=torch.float32, device=device)
                    torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
                    ok = float(acc[0, 0]) == 3.0  # accumulated, not overwritten
            except Exception:  # older torch: the fallbacks below
                ok = False
            if not ok:
                log.warning("torch.%s(out_dtype=float32) is unavailable for %s on %s: the LM head rounds %s",
                            op, dtype, device.type, "logits to it first" if op == "mm"
                            else "each chunk's weight gradient to it before accumulating")
        _MM_FP32[key] = ok
    return _MM_FP32[key]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as a fresh tensor in the accumulation dtype (float32 for half inputs), not
    rounded to half first where torch can."""
    if _fp32_out_ok("mm", a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).to(_acc_dtype(a.dtype))


def _logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``scale·(h Wᵀ + b)`` as a fresh float32 (or float64) ``[rows, V]`` tensor."""
    out = _mm_acc(h, w.t())
    if bias is not None:
        out += bias.to(out.dtype)
    if scale != 1.0:
        out *= scale
    return out


def lse_and_target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp per row, log-prob of the row's target) of float ``logits [rows, V]``."""
    lse = torch.logsumexp(logits, dim=-1)
    return lse, logits.gather(1, targets[:, None]).squeeze(1) - lse


def grad_logits(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """``coef·(onehot(target) − softmax(logits))`` per row, in ``dtype``: the gradient of
    ``coef·logp(target)`` with respect to the logits."""
    p = torch.exp(logits - lse[:, None])
    hit = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    return ((hit.to(p.dtype) - p) * coef[:, None]).to(dtype)


def grad_logits_into(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor,
                     out: torch.Tensor) -> None:
    """:func:`grad_logits` written into ``out`` (a chunk's rows of a group buffer), compiled."""
    out.copy_(grad_logits(logits, lse, targets, coef, out.dtype))


def _grad_logits_into_inplace(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor,
                              out: torch.Tensor) -> None:
    """:func:`grad_logits_into` in eager ops that reuse ``logits`` (a temporary of the caller's)
    for the softmax: two full-size passes in place and one cast into ``out``, no temporaries."""
    p = logits.sub_(lse[:, None]).exp_()  # softmax
    p.scatter_add_(1, targets[:, None], p.new_full((p.shape[0], 1), -1.0))  # softmax - onehot
    torch.mul(p, (-coef)[:, None], out=out)


def lse_logps_and_grad(logits: torch.Tensor, targets: torch.Tensor,
                       out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lse_and_target_logps`, and ``onehot(target) − softmax(logits)`` (the gradient of
    each row's log-prob) written into ``out`` (rows of the kept buffer, in its dtype); compiled,
    one more read of the logits than the log-sum-exp alone, where the backward would have
    written and read them again. Inductor writes straight into ``out``, whatever its offset in
    the buffer, with no temporary and no recompile."""
    lse, logp = lse_and_target_logps(logits, targets)
    out.copy_(grad_logits(logits, lse, targets, torch.ones_like(lse), out.dtype))
    return lse, logp


def _lse_logps_and_grad_inplace(logits: torch.Tensor, targets: torch.Tensor,
                                out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lse_logps_and_grad` in eager ops, the softmax made in ``logits`` (the caller's temporary)."""
    lse, logp = lse_and_target_logps(logits, targets)
    _grad_logits_into_inplace(logits, lse, targets, torch.ones_like(lse), out)
    return lse, logp


_COMPILED: dict[str, Callable] = {}


def _dynamo_on() -> bool:
    """False where torch.compile would quietly run the function unfused (Dynamo disabled or
    unsupported): then the in-place eager versions are the cheaper ones."""
    try:
        import torch._dynamo as dynamo

        return bool(dynamo.is_dynamo_supported()) and not dynamo.config.disable
    except Exception:
        return False
_COMPILE_BROKEN: list[bool] = []
#: set when keeping the logits' gradient ran out of memory: recompute from then on in this process
_KEEP_OOM: list[bool] = []


def _stop_keeping(nbytes: int) -> None:
    if not _KEEP_OOM:
        log.warning("out of memory keeping the LM head's logits gradient (%.2f GiB): recomputing the logits in "
                    "the backward chunk by chunk from now on (lm_head_grad_cache_gib=0 skips trying)", nbytes / 2**30)
    _KEEP_OOM.append(True)


def _graph_sensitive() -> bool:
    """Inside a CUDA-graph capture, or a rehearsal of one that forbids host syncs
    (worker.kto.graphed): an error there belongs to the graph, not to the compiler."""
    return torch.cuda.is_available() and (torch.cuda.is_current_stream_capturing()
                                          or torch.cuda.get_sync_debug_mode() == 2)


def _run(name: str, fn: Callable, eager: Callable, compiled: bool, *args):
    """``fn(*args)`` through ``torch.compile`` when asked and not known broken, else ``eager(*args)``."""
    if compiled and not _COMPILE_BROKEN and _dynamo_on():
        if name not in _COMPILED:
            if _graph_sensitive():  # a first compile there would sync (autotuning): eager ops for this one
                return eager(*args)
            _COMPILED[name] = torch.compile(fn, dynamic=True)
        try:
            return _COMPILED[name](*args)
        except _OOM:
            raise  # not a compiler problem: eager ops would need more memory still
        except Exception as e:  # no compiler / a torch build that cannot: eager from now on
            if _graph_sensitive():
                raise  # a CUDA-graph capture or its sync-free rehearsal failed, not the compiler
            log.warning("compiled LM-head kernels unavailable, using eager ops: %r", e)
            _COMPILE_BROKEN.append(True)
    return eager(*args)


def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in float32, without rounding ``a @ b`` to half first where
    torch can; else the product in the inputs' dtype (a float32 GEMM of half inputs would copy
    them and run several times slower)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _fp32_out_ok("addmm", a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b))


def _keep_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The ``[rows, V]`` buffer for the kept gradient, or None (recompute) where it does not fit."""
    try:
        return torch.empty(rows, vocab, dtype=dtype, device=device)
    except _OOM:
        if _graph_sensitive():
            raise
        _stop_keeping(rows * vocab * dtype.itemsize)
        return None


class ChunkedLMHeadLogps(torch.autograd.Function):
    """``log softmax(scale·(hidden Wᵀ + b))[row, target]`` for ``hidden [N, H]``, ``targets [N]``
    -> ``[N]`` float32 (float64 for float64 inputs), ``chunk`` rows of logits alive at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, scale: float, compute_dtype, compiled: bool,
                keep_grads: bool, group_rows: int):
        dev = hidden.device
        with torch.autocast(dev.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            n = h.shape[0]
            # both probes here, in the first (eager) call: the backward may first need the
            # accumulating one inside a CUDA-graph capture, where probing cannot sync
            _fp32_out_ok("addmm", dev, compute_dtype)
            out = torch.empty(n, dtype=_acc_dtype(compute_dtype), device=dev)
            lse = torch.empty_like(out)
            kept = _keep_buffer(n, w.shape[0], compute_dtype, dev) if keep_grads else None
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                logits = _logits(h[s:e], w, b, scale)
                if kept is not None:
                    try:
                        lse[s:e], out[s:e] = _run("lse+grad", lse_logps_and_grad, _lse_logps_and_grad_inplace,
                                                  compiled, logits, targets[s:e], kept[s:e])
                        continue
                    except _OOM:  # a temporary of the pass
                        if _graph_sensitive():
                            raise
                    # out of the except block, whose traceback holds the buffer's rows: now it is freed
                    kept = logits = None  # the backward recomputes every chunk
                    _stop_keeping(n * w.shape[0] * compute_dtype.itemsize)
                    logits = _logits(h[s:e], w, b, scale)  # the in-place pass may have used them
                lse[s:e], out[s:e] = _run(
                    "lse", lse_and_target_logps, lse_and_target_logps, compiled, logits, targets[s:e])
                del logits
        # saved, not kept on ctx: autograd frees it after the backward (or keeps it for a second
        # one with retain_graph), however long the output lives on
        ctx.save_for_backward(hidden, weight, bias, targets, lse, kept)
        ctx.chunk, ctx.scale, ctx.compute_dtype, ctx.compiled = chunk, scale, compute_dtype, compiled
        ctx.group_rows = group_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse, kept = ctx.saved_tensors
        chunk, scale, cdt, compiled = ctx.chunk, ctx.scale, ctx.compute_dtype, ctx.compiled
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        dev = hidden.device
        grad_h = grad_w = grad_b = None
        with torch.autocast(dev.type, enabled=False):
            h = hidden.to(cdt)
            w = weight.to(cdt)
            b = bias.to(cdt) if bias is not None else None
            n = h.shape[0]
            acc = _acc_dtype(cdt)
            coef = grad_out.to(acc) * scale  # d logp / d raw logits = scale·(onehot - softmax)
            if kept is not None:  # onehot − softmax of every row from the forward: one product per gradient
                c = coef[:, None]
                if need_h:
                    grad_h = _mm_acc(kept, w).mul_(c)
                if need_w:  # Σ_r c_r g_rᵀ h_r: the row scale goes on the narrow operand
                    grad_w = _mm_acc(kept.t(), (h * c).to(cdt))
                if need_b:
                    grad_b = _mm_acc(c.t().to(cdt), kept)[0]
            else:  # recompute chunk by chunk into a group buffer; the products once per group
                if need_h:
                    grad_h = torch.empty(n, h.shape[1], dtype=cdt, device=dev)
                if need_w:
                    grad_w = torch.zeros(w.shape, dtype=acc, device=dev)
                if need_b:
                    grad_b = torch.zeros(w.shape[0], dtype=acc, device=dev)
                rows = min(n, chunk if _KEEP_OOM else max(chunk, ctx.group_rows // chunk * chunk))
                buf = _keep_buffer(rows, w.shape[0], cdt, dev) if rows > chunk else None
                gs = 0
                while gs < n:
                    if buf is None:  # no budget, or no room for it: one chunk at a time
                        rows = min(n, chunk)
                        buf = torch.empty(rows, w.shape[0], dtype=cdt, device=dev)
                    ge = min(n, gs + rows)
                    g = buf[: ge - gs]
                    try:
                        for s in range(gs, ge, chunk):
                            e = min(ge, s + chunk)
                            logits = _logits(h[s:e], w, b, scale)
                            _run("grad", grad_logits_into, _grad_logits_into_inplace, compiled, logits, lse[s:e],
                                 targets[s:e], coef[s:e], g[s - gs: e - gs])
                            del logits
                    except _OOM:  # the group's rows are not summed yet: redo them chunk by chunk
                        if _graph_sensitive() or rows <= chunk:
                            raise
                        _stop_keeping(rows * w.shape[0] * cdt.itemsize)
                        g = buf = logits = None  # freed once this except block is left, before the redo
                        continue
                    if need_h:
                        torch.mm(g, w, out=grad_h[gs:ge])
                    if need_w:
                        _addmm_acc(grad_w, g.t(), h[gs:ge])
                    if need_b:  # no float32 [rows, V] temporary
                        grad_b += g.sum(0, dtype=acc)
                    gs = ge
        if grad_h is not None:
            grad_h = grad_h.to(hidden.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def chunked_token_logps(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        scale: float = 1.0, chunk_size: int = 1024, compiled: bool | None = None,
                        grad_cache_bytes: int = 0) -> torch.Tensor:
    """Per-row log-prob of ``targets`` under the LM head, computed in the autocast dtype when
    autocast is on (as ``F.linear`` would run), else in the promoted dtype of ``hidden`` and the
    weight; float32 out (float64 for float64 inputs). ``compiled``: fuse the passes over the
    logits with ``torch.compile`` (default: on CUDA only). ``grad_cache_bytes``: keep the
    logits' gradient from forward to backward when a backward will run and it takes at most
    this many bytes (``rows × V`` in the compute dtype); else the backward recomputes the logits,
    holding up to this many bytes of their gradient at a time (at least one chunk's), as it does
    chunk by chunk in this process from the first time keeping them ran out of memory."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
    else:
        cdt = torch.promote_types(hidden.dtype, weight.dtype)
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=_acc_dtype(cdt))
    if compiled is None:
        compiled = hidden.device.type == "cuda"
    grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    keep = grads and not _KEEP_OOM and hidden.shape[0] * weight.shape[0] * cdt.itemsize <= grad_cache_bytes
    group_rows = int(grad_cache_bytes // (weight.shape[0] * cdt.itemsize))
    return ChunkedLMHeadLogps.apply(hidden, weight, bias, targets.contiguous(), int(chunk_size), float(scale), cdt,
                                    bool(compiled), keep, group_rows)
