"""CUDA-only checks of the packed path (issue 4); skipped without a GPU, run by bench/gpu_check.sh.

bf16 cannot be compared bit for bit across two kernel schedules, so bf16 checks compare both
paths against a float32 reference: packing must not add error beyond bf16's own."""

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from worker.kto import toy
from worker.kto.data import collate_microbatch, make_plan, tokenize_examples
from worker.kto.logprobs import sequence_logps
from worker.kto.packing import (
    apply_liger,
    liger_available,
    pack_examples,
    pack_to,
    packed_attention,
    packed_sequence_logps,
    resolve_backend,
)
from worker.kto.trainer import KTOTrainConfig, train_kto

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")


def _word_rows(n, lo, hi, vocab, seed=0):
    import random

    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(vocab)}" for _ in range(k))  # noqa: E731
    return [{"prompt": words(rng.randint(lo, hi)) + " ", "completion": words(rng.randint(lo, hi) - 1) + " ",
             "label": rng.random() < 0.5} for _ in range(n)]


def _qwen(vocab, hidden=256, layers=4, heads=8, kv=2, seed=0):
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module")
def setup():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import train_throughput as tt

    tok = tt.make_tokenizer(2000)
    rows = _word_rows(24, 16, 200, 2000)
    data, _ = tokenize_examples(rows, tok, None)
    plan = make_plan(len(data), 8, seed=0)
    return tok, rows, data, plan


def test_backend_self_check_picks_a_fast_kernel():
    chosen = resolve_backend("auto", DEV, torch.bfloat16)
    kl = resolve_backend("auto", DEV, torch.bfloat16, bottom_right=True)
    print("\nauto backend on", torch.cuda.get_device_name(), "bf16: policy forward", chosen, "/ shared-prompt KL", kl)
    assert chosen in ("varlen", "varlen_repeat", "flex")
    assert kl in ("varlen", "varlen_repeat", "flex", "sdpa")  # sdpa: correct, only slower


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_float32_packed_equals_padded_on_cuda(setup, backend):
    tok, _, data, plan = setup
    model = _qwen(len(tok)).to(DEV)
    for mb in plan.microbatches[:2]:
        b = {k: v.to(DEV) for k, v in collate_microbatch(data, mb, plan, tok.pad_token_id).items()}
        lp = sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
        with torch.no_grad():
            kl = sequence_logps(model, b["kl_input_ids"], b["kl_attention_mask"], b["kl_completion_mask"])
        g = torch.autograd.grad(lp.sum(), [p for p in model.parameters()])
        with packed_attention(model):
            plp, pkl = packed_sequence_logps(model, pack_to(pack_examples(data, mb, plan), DEV), backend=backend)
        torch.testing.assert_close(plp, lp, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(pkl, kl, rtol=1e-4, atol=1e-3)
        pg = torch.autograd.grad(plp.sum(), [p for p in model.parameters()])
        for a, c in zip(pg, g):  # per tensor, relative to its norm (atomics reorder float32 sums)
            assert (a - c).norm() <= 1e-3 * c.norm() + 1e-6


@pytest.mark.parametrize("share_prompt", [True, False])
def test_bf16_packed_matches_padded_within_bf16_error(setup, share_prompt):
    tok, _, data, plan = setup
    ref_model = _qwen(len(tok)).to(DEV)  # float32 truth
    model = copy.deepcopy(ref_model).to(torch.bfloat16)
    mb = plan.microbatches[0]
    b = {k: v.to(DEV) for k, v in collate_microbatch(data, mb, plan, tok.pad_token_id).items()}
    with torch.no_grad():
        truth = sequence_logps(ref_model, b["input_ids"], b["attention_mask"], b["completion_mask"])
        truth_kl = sequence_logps(ref_model, b["kl_input_ids"], b["kl_attention_mask"], b["kl_completion_mask"])
    padded = sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
    g_pad = torch.autograd.grad(padded.sum(), list(model.parameters()))
    with torch.no_grad():
        padded_kl = sequence_logps(model, b["kl_input_ids"], b["kl_attention_mask"], b["kl_completion_mask"])
    with packed_attention(model):
        packed, packed_kl = packed_sequence_logps(model, pack_to(pack_examples(data, mb, plan, share_prompt=share_prompt),
                                                                 DEV))
    g_pack = torch.autograd.grad(packed.sum(), list(model.parameters()))
    scale = truth.abs().max()
    e_pad, e_pack = (padded - truth).abs().max() / scale, (packed - truth).abs().max() / scale
    e_pad_kl, e_pack_kl = (padded_kl - truth_kl).abs().max() / scale, (packed_kl - truth_kl).abs().max() / scale
    print(f"\nbf16 rel error vs fp32: padded {e_pad:.2e} packed {e_pack:.2e}; KL padded {e_pad_kl:.2e} packed {e_pack_kl:.2e}")
    assert e_pack <= 2 * e_pad + 2e-3 and e_pack_kl <= 2 * e_pad_kl + 2e-3
    cos = torch.nn.functional.cosine_similarity(torch.cat([x.float().flatten() for x in g_pack]),
                                                torch.cat([x.float().flatten() for x in g_pad]), dim=0)
    assert cos > 0.99, cos


@pytest.mark.parametrize("liger", [False, True])
def test_short_bf16_training_run_packed_vs_padded(setup, tmp_path, liger):
    if liger and not liger_available():
        pytest.skip("liger_kernel is not importable")
    tok, rows, _, _ = setup
    base = _qwen(len(tok), seed=1).to(torch.bfloat16)
    cfg = dict(beta=0.1, learning_rate=1e-4, microbatch_size=8, max_steps=3, shuffle=False, max_length=512,
               save_final=False, seed=0, liger_kernels=liger)
    runs = {p: train_kto(KTOTrainConfig(packing=p, **cfg), copy.deepcopy(base), rows, tmp_path / f"p{p}",
                         tokenizer=tok, resume=False) for p in (False, True)}
    la, lb = [h["loss"] for h in runs[False].history], [h["loss"] for h in runs[True].history]
    print(f"\nliger={liger} losses padded {la} packed {lb}")
    assert lb[0] == pytest.approx(0.5, abs=1e-5)  # reference scored on the same packs: r = 0 exactly
    assert lb == pytest.approx(la, abs=5e-3)
    assert all(torch.isfinite(torch.tensor(h["grad_norm"])) for h in runs[True].history)


def test_liger_kernels_keep_packed_logps(setup):
    if not liger_available():
        pytest.skip("liger_kernel is not importable")
    tok, _, data, plan = setup
    model = _qwen(len(tok)).to(DEV, torch.bfloat16)
    patched = copy.deepcopy(model)
    assert apply_liger(patched)
    pk = pack_to(pack_examples(data, plan.microbatches[0], plan), DEV)
    with torch.no_grad(), packed_attention(model, patched):
        a, _ = packed_sequence_logps(model, pk)
        b, _ = packed_sequence_logps(patched, pk)
    assert ((a - b).abs().max() / a.abs().max()).item() < 5e-3


def test_toy_model_trains_on_cuda_with_packing(tmp_path):
    """The engine's own toy model end to end on CUDA (float32 weights, bf16 autocast): the fast
    kernel runs (autocast's dtype, not RoPE's float32), and the result equals the padded run's."""
    from worker.kto.packing import last_backends

    tok = toy.make_tokenizer()
    rows = toy.make_feedback(32, desirable_fraction=0.4, seed=6)
    cfg = dict(microbatch_size=8, max_steps=4, learning_rate=3e-3, max_length=32, save_final=False, shuffle=False)
    res = train_kto(KTOTrainConfig(**cfg), toy.make_model(tok, seed=1), rows, tmp_path / "toy", tokenizer=tok,
                    resume=False)
    used = last_backends()
    print("\nbackends used (float32 weights, bf16 autocast):", used)
    assert used["forward"] in ("varlen", "varlen_repeat", "flex")
    assert res.step == 4 and res.history[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    pad = train_kto(KTOTrainConfig(packing=False, **cfg), toy.make_model(tok, seed=1), rows, tmp_path / "pad",
                    tokenizer=tok, resume=False)
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in pad.history], abs=3e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lm_head_matches_float64_on_cuda(dtype, monkeypatch):
    """The hand-written LM-head backward on CUDA (float32 logits straight from the bf16 product,
    float32 weight-gradient accumulation) against float64 autograd through full logits: no worse
    than the checkpointed autograd path."""
    from worker.kto.lm_head import chunked_token_logps
    from worker.kto.logprobs import lm_head_impl, token_logps_from_hidden

    g = torch.Generator(device="cpu").manual_seed(0)
    n, hdim, v = 3000, 256, 32000
    h0 = (torch.randn(n, hdim, generator=g) * 0.5).to(DEV, dtype)
    w0 = (torch.randn(v, hdim, generator=g) * 0.05).to(DEV, dtype)
    t = torch.randint(0, v, (n,), generator=g).to(DEV)
    up = torch.randn(n, generator=g).to(DEV)
    h64, w64 = h0.double().requires_grad_(), w0.double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.t(), -1).gather(1, t[:, None]).squeeze(1)
    rh, rw = torch.autograd.grad((ref * up.double()).sum(), (h64, w64))
    errs = {}
    # "fused" keeps the logits' gradient from the forward (192 MB here in bf16), "-recompute" recomputes
    # them chunk by chunk, "-grouped" in groups of two chunks (rows 0-2047, then 2048-2999)
    from worker.kto import lm_head

    group = (2048 * v * dtype.itemsize + 1) / 2**30
    monkeypatch.setattr(lm_head, "_KEEP_OOM", [])  # whatever ran before: this test's paths are the ones asked
    buffers: list[int] = []
    real_buffer = lm_head._keep_buffer
    monkeypatch.setattr(lm_head, "_keep_buffer", lambda rows, *a: buffers.append(rows) or real_buffer(rows, *a))
    for name, impl, gib in (("fused", "fused", 1.0), ("fused-eager", "fused-eager", 1.0),
                            ("fused-recompute", "fused", 0.0), ("fused-eager-recompute", "fused-eager", 0.0),
                            ("fused-grouped", "fused", group), ("checkpoint", "checkpoint", 0.0)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        head = torch.nn.Linear(hdim, v, bias=False, device=DEV, dtype=dtype)
        head.weight = torch.nn.Parameter(w)
        with lm_head_impl(impl, grad_cache_gib=gib):
            out = token_logps_from_hidden(h, t, head, None, chunk_size=1024)
        gh, gw = torch.autograd.grad((out * up).sum(), (h, head.weight))
        rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
        errs[name] = (rel(out, ref), rel(gh, rh), rel(gw, rw))
    print("\nrelative errors vs float64 (logps, grad h, grad W):", dtype, errs)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert buffers == [n, n, 2048] and not lm_head._KEEP_OOM  # kept twice, then one group buffer

    assert not lm_head._COMPILE_BROKEN, "the compiled LM-head kernels fell back to eager on CUDA"
    if dtype == torch.bfloat16:  # the image's torch takes float32 outputs for both products
        assert lm_head._fp32_out_ok("mm", DEV, dtype) and lm_head._fp32_out_ok("addmm", DEV, dtype)
    fused = ("fused", "fused-eager", "fused-recompute", "fused-eager-recompute", "fused-grouped")
    assert all(e <= tol for name in fused for e in errs[name]), errs
    assert all(f <= c * 2 + 1e-7 for name in fused for f, c in zip(errs[name], errs["checkpoint"])), errs
    assert chunked_token_logps(h0, t, w0, None).dtype == torch.float32


@pytest.mark.parametrize("liger", [False, True])
def test_cuda_graph_replay_follows_the_eager_trajectory(setup, tmp_path, caplog, liger):
    """Fixed-length rows repeat the pack's shape, so from the third step on the whole step is a
    replayed CUDA graph (worker.kto.graphed); its losses, gradient norms and weights follow the
    eager run's, and the learning-rate schedule goes on inside the graph."""
    import logging

    if liger and not liger_available():
        pytest.skip("liger_kernel is not importable")
    tok = setup[0]
    rows = _word_rows(48, 40, 40, 2000, seed=3)
    base = _qwen(len(tok), seed=2).to(torch.bfloat16)
    cfg = dict(beta=0.1, learning_rate=1e-4, lr_scheduler="linear", microbatch_size=8, max_steps=6, shuffle=False,
               max_length=512, save_final=False, seed=0, liger_kernels=liger)
    with caplog.at_level(logging.INFO, logger="worker.kto.graphed"):
        graphed = train_kto(KTOTrainConfig(cuda_graphs=True, **cfg), copy.deepcopy(base), rows, tmp_path / "g",
                            tokenizer=tok, resume=False)
    assert "captured the training step as a CUDA graph" in caplog.text, caplog.text
    assert "training goes on without graphs" not in caplog.text  # rehearsal and capture both worked
    from worker.kto.graphed import EAGER_RUNS

    # one capture after the eager run and the rehearsal, then every step replayed
    assert graphed.runtime["cuda_graph_captures"] == 1
    assert graphed.runtime["cuda_graph_replays"] == 6 - EAGER_RUNS - 1
    assert [h["step_mode"] for h in graphed.history] == ["eager", "rehearsal", "capture"] + ["replay"] * 3
    eager = train_kto(KTOTrainConfig(cuda_graphs=False, **cfg), copy.deepcopy(base), rows, tmp_path / "e",
                      tokenizer=tok, resume=False)
    for key in ("loss", "grad_norm", "kl", "lr"):
        got, want = [h[key] for h in graphed.history], [h[key] for h in eager.history]
        print(f"\nliger={liger} {key}: graphed {got}\n{' ' * len(key)}  eager   {want}")
        assert got == pytest.approx(want, rel=1e-3, abs=1e-5), key
    for (name, p), q in zip(graphed.model.named_parameters(), eager.model.parameters()):
        assert torch.allclose(p.float(), q.float(), rtol=0, atol=2e-3), name


def test_cuda_graphs_with_bucketed_variable_length_packs(setup, tmp_path, caplog):
    """Variable-length rows padded to 256-token buckets: steps are captured and replayed per
    bucket shape (later shapes without warm-up runs), and the run follows the eager one."""
    import logging

    tok = setup[0]
    rows = _word_rows(80, 16, 120, 2000, seed=4)
    base = _qwen(len(tok), seed=3).to(torch.bfloat16)
    # 16 steps over 10 microbatches: the second epoch's packs repeat the first epoch's shapes
    cfg = dict(beta=0.1, learning_rate=1e-4, microbatch_size=8, max_steps=16, shuffle=False, max_length=256,
               save_final=False, seed=0, pack_bucket=256)
    with caplog.at_level(logging.INFO, logger="worker.kto.graphed"):
        graphed = train_kto(KTOTrainConfig(cuda_graphs=True, **cfg), copy.deepcopy(base), rows, tmp_path / "g",
                            tokenizer=tok, resume=False)
    assert "training goes on without graphs" not in caplog.text, caplog.text
    print(f"\nbucketed: {graphed.runtime}, {caplog.text.count('captured the training step')} shapes captured")
    modes = [h["step_mode"] for h in graphed.history]
    assert modes[:2] == ["eager", "rehearsal"] and set(modes[2:]) <= {"capture", "replay"}, modes
    assert modes.count("capture") == graphed.runtime["cuda_graph_captures"] >= 1
    assert modes.count("replay") == graphed.runtime["cuda_graph_replays"] >= 4, modes  # epoch 2 repeats shapes
    eager = train_kto(KTOTrainConfig(cuda_graphs=False, **cfg), copy.deepcopy(base), rows, tmp_path / "e",
                      tokenizer=tok, resume=False)
    got, want = [h["loss"] for h in graphed.history], [h["loss"] for h in eager.history]
    assert got == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_auto_cuda_graphs_replay_fixed_lengths_and_leave_chat_lengths_eager(setup, tmp_path, caplog):
    """The default (cuda_graphs="auto") on a full fine-tune: fixed-length rows are replayed from
    the third step; chat-length rows without buckets never make half the steps with one shape,
    so every step runs eagerly, without a rehearsal, and the run equals one with graphs off."""
    import logging

    tok = setup[0]
    cfg = dict(beta=0.1, learning_rate=1e-4, microbatch_size=8, shuffle=False, max_length=512, save_final=False,
               seed=0)
    base = _qwen(len(tok), seed=2).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        fixed_rows = _word_rows(40, 40, 40, 2000, seed=3)
        fixed = train_kto(KTOTrainConfig(max_steps=5, **cfg), copy.deepcopy(base), fixed_rows, tmp_path / "f",
                          tokenizer=tok, resume=False)
        # 5 microbatches, 8 steps: the second epoch brings 3 shapes back, each a third of the steps at most
        varlen_rows = _word_rows(40, 16, 120, 2000, seed=4)
        chat = train_kto(KTOTrainConfig(max_steps=8, **cfg), copy.deepcopy(base), varlen_rows, tmp_path / "v",
                         tokenizer=tok, resume=False)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("worker.kto") and r.levelno >= logging.WARNING]
    assert ours == []  # nothing failed, nothing was refused
    assert [h["step_mode"] for h in fixed.history] == ["eager", "rehearsal", "capture", "replay", "replay"]
    assert [h["step_mode"] for h in chat.history] == ["eager"] * 8
    assert chat.runtime["cuda_graph_captures"] == 0
    off = train_kto(KTOTrainConfig(max_steps=8, cuda_graphs=False, **cfg), copy.deepcopy(base), varlen_rows,
                    tmp_path / "off", tokenizer=tok, resume=False)
    assert [h["loss"] for h in chat.history] == pytest.approx([h["loss"] for h in off.history], rel=1e-4, abs=1e-6)


def test_step_readout_reads_a_step_late_and_times_the_device():
    """worker.kto.readout on CUDA: values arrive in order one step late, from pinned buffers,
    with the time between two step ends on the device's clock."""
    from worker.kto.readout import StepReadout

    r = StepReadout(DEV, n_values=2)
    assert r.lag == 1
    a = torch.randn(2048, 2048, device=DEV)
    out = []
    for step in range(1, 5):
        for _ in range(4):
            a = torch.tanh(a @ a / 2048)  # some device work per step
        r.submit([a.sum(), torch.tensor(float(step), device=DEV)], {"step": step})
        out += list(r.ready())
        assert len(r) == 1  # the step just issued is still on its way
    out += list(r.drain())
    assert [m["step"] for _, m in out] == [1, 2, 3, 4] and [v[1] for v, _ in out] == [1.0, 2.0, 3.0, 4.0]
    assert "device_step_s" not in out[0][1] and all(m["device_step_s"] > 0 for _, m in out[1:])


def test_trainer_metrics_carry_device_step_time_on_cuda(tmp_path):
    """The trainer's metrics on CUDA: every step once, in order, with device_step_s from the
    second step on, and the same losses as a run read at once."""
    import functools

    from worker.kto import readout as readout_mod
    from worker.kto import trainer as trainer_mod

    tok = toy.make_tokenizer()
    rows = toy.make_feedback(32, desirable_fraction=0.4, seed=6)
    cfg = dict(microbatch_size=8, max_steps=4, learning_rate=3e-3, max_length=32, save_final=False, shuffle=False)
    lagged = train_kto(KTOTrainConfig(**cfg), toy.make_model(tok, seed=1), rows, tmp_path / "lag", tokenizer=tok,
                       resume=False)
    assert [h["step"] for h in lagged.history] == [1, 2, 3, 4]
    assert "device_step_s" not in lagged.history[0] and all(h["device_step_s"] > 0 for h in lagged.history[1:])
    original = trainer_mod.StepReadout
    trainer_mod.StepReadout = functools.partial(readout_mod.StepReadout, lag=0)
    try:
        prompt = train_kto(KTOTrainConfig(**cfg), toy.make_model(tok, seed=1), rows, tmp_path / "now",
                           tokenizer=tok, resume=False)
    finally:
        trainer_mod.StepReadout = original
    # the same computation; only FlashAttention's backward may reorder float additions
    assert [h["loss"] for h in lagged.history] == pytest.approx([h["loss"] for h in prompt.history], rel=1e-5)
