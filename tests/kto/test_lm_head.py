"""The hand-written LM-head backward (worker.kto.lm_head) against autograd through full logits."""

from __future__ import annotations

import pytest
import torch

from worker.kto.lm_head import ChunkedLMHeadLogps, chunked_token_logps
from worker.kto.logprobs import lm_head_impl, token_logps_from_hidden


def _naive(h, t, w, b, scale):
    logits = (h @ w.t() + (b if b is not None else 0)) * scale
    return torch.log_softmax(logits.double(), -1).gather(1, t[:, None]).squeeze(1)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64(with_bias, compiled):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    t = torch.randint(0, 11, (7,), generator=g)
    fn = lambda h, w, b: ChunkedLMHeadLogps.apply(h, w, b, t, 3, 0.7, torch.float64, compiled)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_values_and_grads_equal_full_logits_float32(chunk):
    g = torch.Generator().manual_seed(1)
    n, hdim, v = 37, 16, 97
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = torch.randn(v, hdim, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g)
    out = chunked_token_logps(h, t, w, None, 1.0, chunk)
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


def test_compiled_kernels_equal_eager():
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
    for compiled in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = chunked_token_logps(h, t, w, None, 0.9, 16, compiled=compiled)
        gh, gw = torch.autograd.grad((out * up).sum(), (h, w))
        res[compiled] = (out.detach(), gh, gw)
    assert not lm_head._COMPILE_BROKEN, "the compiled path fell back to eager"
    assert set(lm_head._COMPILED) == {"lse", "grad"}
    for a, b in zip(res[True], res[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inplace_eager_gradient_equals_the_pure_one():
    from worker.kto.lm_head import _grad_logits_inplace, grad_logits

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 33, generator=g)
    lse = torch.logsumexp(logits, -1)
    t = torch.randint(0, 33, (9,), generator=g)
    coef = torch.randn(9, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        pure = grad_logits(logits, lse, t, coef, dtype)
        inplace = _grad_logits_inplace(logits.clone(), lse, t, coef, dtype)
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
