"""The hand-written LM-head backward (worker.kto.lm_head) against autograd through full logits."""

from __future__ import annotations

import pytest
import torch

from worker.kto.lm_head import ChunkedLMHeadLogps, chunked_token_logps
from worker.kto.logprobs import lm_head_impl, token_logps_from_hidden


def _naive(h, t, w, b, scale):
    logits = (h @ w.t() + (b if b is not None else 0)) * scale
    return torch.log_softmax(logits.double(), -1).gather(1, t[:, None]).squeeze(1)


# kept from the forward; or recomputed by chunk, in groups of two chunks (the last one short), in one group
@pytest.mark.parametrize("keep,group_rows", [(True, 0), (False, 0), (False, 6), (False, 100)])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64(with_bias, compiled, keep, group_rows):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    t = torch.randint(0, 11, (7,), generator=g)
    fn = lambda h, w, b: ChunkedLMHeadLogps.apply(  # noqa: E731
        h, w, b, t, 3, 0.7, torch.float64, compiled, keep, group_rows)
    assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("cache", [0, 2**30])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_values_and_grads_equal_full_logits_float32(chunk, cache):
    g = torch.Generator().manual_seed(1)
    n, hdim, v = 37, 16, 97
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = torch.randn(v, hdim, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g)
    out = chunked_token_logps(h, t, w, None, 1.0, chunk, grad_cache_bytes=cache)
    assert out.dtype == torch.float32
    gh, gw = torch.autograd.grad((out * up).sum(), (h, w))
    ref = _naive(h, t, w, None, 1.0)
    rh, rw = torch.autograd.grad((ref * up.double()).sum(), (h, w))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, rh.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw.float(), rtol=1e-4, atol=1e-5)


def test_fused_and_checkpoint_paths_agree_through_the_public_function():
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(12, 50, bias=False)
    h = torch.randn(30, 12, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (30,), generator=g)
    results = {}
    for impl in ("fused", "checkpoint"):
        head.zero_grad()
        with lm_head_impl(impl):
            out = token_logps_from_hidden(h, t, head, None, chunk_size=8)
        gh, = torch.autograd.grad(out.sum() * 1.5, (h,), retain_graph=True)
        out.sum().backward()
        results[impl] = (out.detach(), gh, head.weight.grad.clone())
    for a, b in zip(results["fused"], results["checkpoint"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs_in_bf16_and_returns_float32_grads_in_input_dtypes():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(20, 16, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(40, 16, generator=g, requires_grad=True)  # float32 master weight
    t = torch.randint(0, 40, (20,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_token_logps(h, t, w, None, 1.0, 8)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref = _naive(h.detach().float(), t, w.detach().to(torch.bfloat16).float(), None, 1.0)
    assert (out.detach().double() - ref).abs().max() < 5e-2


def test_no_grad_and_empty_inputs():
    w = torch.randn(9, 4, requires_grad=True)
    with torch.no_grad():
        out = chunked_token_logps(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), w, None)
    assert out.shape == (5,) and not out.requires_grad
    empty = chunked_token_logps(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), w, None)
    assert empty.shape == (0,)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="unknown LM-head"):
        with lm_head_impl("nope"):
            pass


@pytest.mark.parametrize("cache", [0, 2**30])
def test_compiled_kernels_equal_eager(cache):
    """The torch.compile'd passes (CUDA's default) give the eager ops' values and gradients; run
    here through Inductor's CPU backend."""
    from worker.kto import lm_head

    g = torch.Generator().manual_seed(4)
    n, hdim, v = 45, 16, 301
    h0 = torch.randn(n, hdim, generator=g)
    w0 = torch.randn(v, hdim, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g)
    res = {}
    lm_head._COMPILED.clear()
    for compiled in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = chunked_token_logps(h, t, w, None, 0.9, 16, compiled=compiled, grad_cache_bytes=cache)
        gh, gw = torch.autograd.grad((out * up).sum(), (h, w))
        res[compiled] = (out.detach(), gh, gw)
    assert not lm_head._COMPILE_BROKEN, "the compiled path fell back to eager"
    assert set(lm_head._COMPILED) == ({"lse+grad"} if cache else {"lse", "grad"})
    for a, b in zip(res[True], res[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _passes(monkeypatch) -> list[str]:
    """The names of the LM head's passes over logits, in the order they run."""
    from worker.kto import lm_head

    names: list[str] = []
    real = lm_head._run

    def spy(name, *args):
        names.append(name)
        return real(name, *args)

    monkeypatch.setattr(lm_head, "_run", spy)
    return names


def test_the_logits_gradient_is_kept_only_within_its_budget_and_when_a_backward_will_run(monkeypatch):
    """Kept: the backward recomputes no logits. Over budget or without grad: recomputed as before."""
    names = _passes(monkeypatch)
    g = torch.Generator().manual_seed(6)
    n, hdim, v = 10, 8, 50  # 10 × 50 float32 = 2,000 bytes of kept gradient
    w = torch.randn(v, hdim, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    for budget, expect in ((2000, ["lse+grad"] * 3), (1999, ["lse"] * 3 + ["grad"] * 3)):
        names.clear()
        h = torch.randn(n, hdim, generator=g, requires_grad=True)
        chunked_token_logps(h, t, w, None, 1.0, 4, compiled=False, grad_cache_bytes=budget).sum().backward()
        assert names == expect, budget
    names.clear()
    with torch.no_grad():
        chunked_token_logps(torch.randn(n, hdim), t, w, None, 1.0, 4, compiled=False, grad_cache_bytes=2**30)
    frozen = torch.randn(n, hdim)  # nothing needs a gradient: a frozen head on detached rows
    chunked_token_logps(frozen, t, w.detach(), None, 1.0, 4, compiled=False, grad_cache_bytes=2**30)
    assert names == ["lse"] * 6


def test_kept_and_recomputed_gradients_agree_in_bf16_with_bias_and_scale():
    """In bf16 the kept gradient is rounded before its row scale is applied (to the hidden rows,
    for the weight gradient), the recomputed one after: the same size of error either way."""
    g = torch.Generator().manual_seed(7)
    n, hdim, v = 40, 32, 300
    h0 = (torch.randn(n, hdim, generator=g) * 0.5).to(torch.bfloat16)
    w0 = (torch.randn(v, hdim, generator=g) * 0.3).to(torch.bfloat16)
    b0 = (torch.randn(v, generator=g) * 0.1).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g) * 3
    h64, w64, b64 = (x.double().requires_grad_() for x in (h0, w0, b0))
    ref = _naive(h64, t, w64, b64, 0.8)
    exact = torch.autograd.grad((ref * up.double()).sum(), (h64, w64, b64))
    errs = {}
    for cache in (0, 2**30):
        h, w, b = (x.clone().requires_grad_() for x in (h0, w0, b0))
        out = chunked_token_logps(h, t, w, b, 0.8, 16, compiled=False, grad_cache_bytes=cache)
        grads = torch.autograd.grad((out * up).sum(), (h, w, b))
        assert all(x.dtype == torch.bfloat16 for x in grads)
        errs[cache] = [float((a.double() - e).norm() / e.norm()) for a, e in zip(grads, exact)]
    assert all(k <= 2 * r + 1e-3 for k, r in zip(errs[2**30], errs[0])), errs
    assert max(errs[2**30]) < 2e-2, errs


def test_trainer_budget_reaches_the_lm_head(monkeypatch):
    names = _passes(monkeypatch)
    head = torch.nn.Linear(8, 30, bias=False)
    h = torch.randn(5, 8, requires_grad=True)
    t = torch.randint(0, 30, (5,))
    for gib, expect in ((0.0, ["lse", "grad"]), (1.0, ["lse+grad"])):
        names.clear()
        with lm_head_impl("fused-eager", grad_cache_gib=gib):
            token_logps_from_hidden(h, t, head, None, chunk_size=8).sum().backward()
        assert names == expect, gib
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="grad_cache_gib"):
            with lm_head_impl("fused", grad_cache_gib=bad):
                pass


def test_inplace_eager_gradient_equals_the_pure_one():
    from worker.kto.lm_head import _grad_logits_into_inplace, grad_logits

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 33, generator=g)
    lse = torch.logsumexp(logits, -1)
    t = torch.randint(0, 33, (9,), generator=g)
    coef = torch.randn(9, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        pure = grad_logits(logits, lse, t, coef, dtype)
        inplace = torch.empty(logits.shape, dtype=dtype)
        _grad_logits_into_inplace(logits.clone(), lse, t, coef, inplace)
        assert inplace.dtype == pure.dtype == dtype
        torch.testing.assert_close(inplace.float(), pure.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                                   atol=1e-6)


def test_float64_through_the_public_function_and_sequence_sums():
    """token_logps_from_hidden promises float32 whatever the inputs (callers sum into float32)."""
    head = torch.nn.Linear(6, 20, bias=False).double()
    out = token_logps_from_hidden(torch.randn(4, 6, dtype=torch.float64), torch.tensor([1, 2, 3, 4]), head, None)
    assert out.dtype == torch.float32
    torch.zeros(2).index_add(0, torch.tensor([0, 0, 1, 1]), out)  # what sequence_logps does


def test_second_order_gradients_are_refused_clearly():
    h = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    out = chunked_token_logps(h, torch.tensor([0, 1, 2]), w, None)
    (gh,) = torch.autograd.grad(out.sum(), (h,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|second"):
        gh.sum().backward()


def test_the_kept_gradient_is_freed_by_the_backward_while_the_output_lives_on():
    """The trainer keeps step outputs past their backward (metrics): the kept chunks must not
    live as long as they do. A second backward (retain_graph) still finds them."""
    g = torch.Generator().manual_seed(8)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (10,), generator=g)
    out = chunked_token_logps(h, t, w, None, 1.0, 4, compiled=False, grad_cache_bytes=2**30)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 6 and saved[5].shape == (10, 50)  # inputs, lse and the kept gradient of every row
    first = torch.autograd.grad(out.sum(), (h, w), retain_graph=True)
    again = torch.autograd.grad(out.sum(), (h, w))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="freed|second time"):
        out.grad_fn.saved_tensors


def test_the_kept_buffer_dies_with_the_backward(monkeypatch):
    """A weak reference to the very buffer the forward's chunks wrote into: it may not outlive the
    backward while the output lives on (garbage collection off, so a reference cycle would show)."""
    import gc
    import weakref

    from worker.kto import lm_head

    refs: list[weakref.ref] = []
    real = lm_head._run

    def spy(name, *args):
        if name == "lse+grad":  # args: fn, eager, compiled, logits, targets, the chunk's rows of the buffer
            refs.append(weakref.ref(args[-1]._base))
        return real(name, *args)

    monkeypatch.setattr(lm_head, "_run", spy)
    g = torch.Generator().manual_seed(9)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (10,), generator=g)
    gc.disable()
    try:
        out = chunked_token_logps(h, t, w, None, 1.0, 4, compiled=False, grad_cache_bytes=2**30)
        assert len(refs) == 3 and all(r() is not None and r() is refs[0]() for r in refs)
        out.sum().backward()
        assert all(r() is None for r in refs)
        assert out.requires_grad  # still alive, its graph with it
    finally:
        gc.enable()


def test_nothing_compiles_inside_a_cuda_graph_capture_or_its_rehearsal(monkeypatch):
    """A pass met for the first time there (a bucketed shape on the other side of the keep
    budget) runs in eager ops: a first compile would sync. Later, outside, it compiles."""
    from worker.kto import lm_head

    monkeypatch.setattr(lm_head, "_COMPILED", {})
    monkeypatch.setattr(lm_head, "_graph_sensitive", lambda: True)
    g = torch.Generator().manual_seed(10)
    h0, w0 = torch.randn(12, 8, generator=g), torch.randn(40, 8, generator=g)
    t = torch.randint(0, 40, (12,), generator=g)
    res = []
    for compiled in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = chunked_token_logps(h, t, w, None, 1.0, 8, compiled=compiled, grad_cache_bytes=2**30)
        res.append((out.detach(), *torch.autograd.grad(out.sum(), (h, w))))
    assert lm_head._COMPILED == {} and not lm_head._COMPILE_BROKEN
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(lm_head, "_graph_sensitive", lambda: False)
    chunked_token_logps(h0, t, w0.clone().requires_grad_(), None, 1.0, 8, compiled=True, grad_cache_bytes=2**30)
    assert set(lm_head._COMPILED) == {"lse+grad"}


def test_out_of_memory_keeping_the_gradient_falls_back_to_recomputing(monkeypatch, caplog):
    """A run that fitted before the kept gradient must not die of it: the forward drops what it
    kept, the backward recomputes, and later calls in the process no longer try."""
    from worker.kto import lm_head

    monkeypatch.setattr(lm_head, "_KEEP_OOM", [])
    names = _passes(monkeypatch)  # the spy, wrapped once more to fail the second kept chunk
    spy = lm_head._run

    def tight(name, *args):
        if name == "lse+grad" and names.count("lse+grad") == 1:
            names.append(name)
            args[3].sub_(1e9)  # what the in-place pass leaves behind: the logits are used up
            raise lm_head._OOM("CUDA out of memory (simulated)")
        return spy(name, *args)

    monkeypatch.setattr(lm_head, "_run", tight)
    g = torch.Generator().manual_seed(11)
    h0, w0 = torch.randn(10, 8, generator=g), torch.randn(50, 8, generator=g)
    t = torch.randint(0, 50, (10,), generator=g)
    up = torch.randn(10, generator=g)
    res = []
    for budget in (2**30, 0):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = chunked_token_logps(h, t, w, None, 1.0, 4, compiled=False, grad_cache_bytes=budget)
        res.append((out.detach(), *torch.autograd.grad((out * up).sum(), (h, w))))
    # chunk 1 kept, chunk 2 out of memory, 2-3 reduced alone; the backward recomputes all three
    assert names[:7] == ["lse+grad"] * 2 + ["lse"] * 2 + ["grad"] * 3 and len(names) == 7 + 6
    assert "out of memory keeping the LM head's logits gradient" in caplog.text
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)
    names.clear()
    h = h0.clone().requires_grad_()
    chunked_token_logps(h, t, w0, None, 1.0, 4, compiled=False, grad_cache_bytes=2**30).sum().backward()
    assert "lse+grad" not in names


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_gradient_products_run_once_per_buffer_not_per_chunk(with_bias):
    """The chunks' kept gradients share one buffer, so the backward's weight gradient is one
    product over all rows (written once), not a float32 accumulator read and written per chunk;
    over the budget, once per group of chunks that fits it; with none, per chunk."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(12)
    h0, w0 = torch.randn(20, 8, generator=g), torch.randn(50, 8, generator=g)
    b0 = torch.randn(50, generator=g) if with_bias else None
    t = torch.randint(0, 50, (20,), generator=g)
    grads = {}
    # kept (20 × 50 float32 = 4,000 bytes); over the budget: groups of 8 rows, 2 chunks each (8, 8, 4); none
    for cache in (2**30, 8 * 50 * 4, 0):
        params = [h0.clone().requires_grad_(), w0.clone().requires_grad_()]
        if with_bias:
            params.append(b0.clone().requires_grad_())
        out = chunked_token_logps(params[0], t, params[1], params[2] if with_bias else None, 1.0, 4,
                                  compiled=False, grad_cache_bytes=cache)
        with Count() as seen:
            grads[cache] = torch.autograd.grad(out.sum(), params)
        products = sum(op in ("mm", "addmm", "addmm_") for op in seen.ops)
        # kept: hidden, weight (and bias) once each; recomputed: each of the 5 chunks' logits, and the two
        # products once per group (the bias's gradient is a sum there)
        assert products == {2**30: 3 if with_bias else 2, 8 * 50 * 4: 5 + 3 * 2, 0: 5 + 5 * 2}[cache], \
            (cache, seen.ops)
    for cache in (8 * 50 * 4, 0):
        for a, b in zip(grads[2**30], grads[cache]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_room_for_the_kept_buffer_recomputes_instead(monkeypatch, caplog):
    """The buffer is taken before the first chunk: where it does not fit, the step runs as
    without the budget (one warning), rather than dying of the optimisation."""
    from worker.kto import lm_head

    monkeypatch.setattr(lm_head, "_KEEP_OOM", [])
    names = _passes(monkeypatch)
    real_empty = torch.empty

    def empty(*size, **kw):
        if tuple(size) == (10, 50):  # the kept buffer's shape here, nothing else's
            raise lm_head._OOM("CUDA out of memory (simulated)")
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    g = torch.Generator().manual_seed(13)
    h0, w0 = torch.randn(10, 8, generator=g), torch.randn(50, 8, generator=g)
    t = torch.randint(0, 50, (10,), generator=g)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    out = chunked_token_logps(h, t, w, None, 1.0, 4, compiled=False, grad_cache_bytes=2**30)
    gh, gw = torch.autograd.grad(out.sum(), (h, w))
    monkeypatch.setattr(torch, "empty", real_empty)
    assert names == ["lse"] * 3 + ["grad"] * 3
    assert "out of memory keeping the LM head's logits gradient" in caplog.text and lm_head._KEEP_OOM
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = chunked_token_logps(h, t, w, None, 1.0, 4, compiled=False, grad_cache_bytes=0)
    for a, b in zip((out, gh, gw), (ref, *torch.autograd.grad(ref.sum(), (h, w)))):
        torch.testing.assert_close(a, b)


# 5 chunks of 4 rows: groups of 2 chunks (8, 8, 4), the error on the first group's second chunk or on the
# second group's first (after the first group's sums); or one group of all 20 rows
@pytest.mark.parametrize("group_rows,fail_at,grads_run", [(8, 2, 1 + 1 + 5), (8, 3, 2 + 1 + 3), (100, 2, 1 + 1 + 5)])
def test_out_of_memory_inside_a_backward_group_redoes_its_rows_chunk_by_chunk(monkeypatch, caplog, group_rows,
                                                                             fail_at, grads_run):
    """Over the keep budget the backward holds up to the budget of gradient rows at a time; an
    out-of-memory while filling a group (nothing of it summed yet) redoes that group one chunk
    at a time, with the same gradients, and later calls no longer group."""
    from worker.kto import lm_head

    monkeypatch.setattr(lm_head, "_KEEP_OOM", [])
    names = _passes(monkeypatch)
    spy = lm_head._run

    def tight(name, *args):
        if name == "grad" and names.count("grad") == fail_at - 1:
            names.append(name)
            args[3].sub_(1e9)  # the in-place pass may have used up the logits
            raise lm_head._OOM("CUDA out of memory (simulated)")
        return spy(name, *args)

    monkeypatch.setattr(lm_head, "_run", tight)
    g = torch.Generator().manual_seed(14)
    h0, w0, b0 = torch.randn(20, 8, generator=g), torch.randn(50, 8, generator=g), torch.randn(50, generator=g)
    t = torch.randint(0, 50, (20,), generator=g)
    up = torch.randn(20, generator=g)
    res = []
    for rows in (group_rows, 0):  # the forward keeps nothing; then no budget
        params = [x.clone().requires_grad_() for x in (h0, w0, b0)]
        out = ChunkedLMHeadLogps.apply(*params, t, 4, 1.0, torch.float32, False, False, rows)
        res.append((out.detach(), *torch.autograd.grad((out * up).sum(), params)))
    assert names == ["lse"] * 5 + ["grad"] * grads_run + ["lse"] * 5 + ["grad"] * 5
    assert "out of memory keeping the LM head's logits gradient" in caplog.text and lm_head._KEEP_OOM
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)
    buffers = []  # from now on in this process: no group buffer, one chunk at a time
    monkeypatch.setattr(lm_head, "_keep_buffer", lambda *a: buffers.append(a))
    h = h0.clone().requires_grad_()
    ChunkedLMHeadLogps.apply(h, w0, None, t, 4, 1.0, torch.float32, False, False, group_rows).sum().backward()
    assert buffers == [] and h.grad is not None


def test_out_of_memory_while_keeping_frees_the_buffer_before_recomputing(monkeypatch):
    """The forward's fallback must not hold the kept buffer (up to the whole budget) while it
    recomputes the chunk's logits: that would need the memory that just ran out."""
    import weakref

    from worker.kto import lm_head

    monkeypatch.setattr(lm_head, "_KEEP_OOM", [])
    kept: list[weakref.ref] = []
    alive_at_logits: list[bool] = []
    real_run, real_logits = lm_head._run, lm_head._logits

    def run(name, *args):
        if name == "lse+grad":
            kept.append(weakref.ref(args[-1]._base))
            if len(kept) == 2:
                raise lm_head._OOM("CUDA out of memory (simulated)")
        return real_run(name, *args)

    def logits(*args):
        alive_at_logits.append(bool(kept) and kept[0]() is not None)
        return real_logits(*args)

    monkeypatch.setattr(lm_head, "_run", run)
    monkeypatch.setattr(lm_head, "_logits", logits)
    g = torch.Generator().manual_seed(15)
    h, w = torch.randn(10, 8, generator=g, requires_grad=True), torch.randn(50, 8, generator=g)
    t = torch.randint(0, 50, (10,), generator=g)
    chunked_token_logps(h, t, w, None, 1.0, 4, compiled=False, grad_cache_bytes=2**30).sum().backward()
    # forward: chunk 1 (no buffer yet), chunk 2, chunk 2 again after the error, chunk 3; backward: 3 chunks
    assert alive_at_logits[:4] == [False, True, False, False] and len(alive_at_logits) == 4 + 3


def test_the_accumulating_product_is_probed_in_the_forward_never_inside_a_capture(monkeypatch):
    """The kept and single-group backwards never call the float32 ``addmm``; a later grouped
    backward may be the first to, inside a CUDA-graph capture, where the probe's read-back
    would sync. So the forward probes it, and a probe met inside a capture refuses."""
    from worker.kto import lm_head

    seen = []
    real = lm_head._fp32_out_ok
    monkeypatch.setattr(lm_head, "_fp32_out_ok", lambda op, *a: seen.append(op) or real(op, *a))
    g = torch.Generator().manual_seed(16)
    with torch.no_grad():
        chunked_token_logps(torch.randn(6, 8, generator=g), torch.randint(0, 50, (6,), generator=g),
                            torch.randn(50, 8, generator=g), None)
    assert "addmm" in seen
    monkeypatch.setattr(lm_head, "_MM_FP32", {})
    monkeypatch.setattr(lm_head, "_graph_sensitive", lambda: True)
    with pytest.raises(RuntimeError, match="outside a CUDA-graph capture"):
        real("addmm", torch.device("cuda"), torch.bfloat16)
