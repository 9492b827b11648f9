"""Padding-free packed microbatches (issue 4): per-example log-probs, gradients and the training
trajectory equal the padded path's, in float32, on the toy Llama and a tiny Qwen2-shaped model."""

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from worker.kto import toy
from worker.kto.data import FeedbackExample, collate_microbatch, make_plan, tokenize_examples
from worker.kto.logprobs import sequence_logps
from worker.kto.packing import (
    ATTN_NAME,
    pack_examples,
    packed_attention,
    packed_sequence_logps,
    resolve_backend,
)
from worker.kto.trainer import KTOTrainConfig, resolve_packing, train_kto


def _qwen2(tok, seed=0):
    """Qwen2 layout (q/k/v biases, GQA, tied embeddings) at toy size."""
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


MODELS = {"llama": lambda tok: toy.make_model(tok, seed=1), "qwen2": _qwen2}


def _data(tok, n=10, max_length=None):
    rows = toy.make_feedback(n - 2, desirable_fraction=0.5, seed=3)
    rows += [FeedbackExample("12+3=", "15 and some more words here", True),
             FeedbackExample([{"role": "user", "content": "what is 9+9?"}], "18", False)]
    data, _ = tokenize_examples(rows, tok, max_length=max_length)
    return data


def _padded(model, data, mb, plan, pad_id, max_length=None):
    b = collate_microbatch(data, mb, plan, pad_id, max_length)
    lp = sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"], chunk_size=7)
    with torch.no_grad():
        kl = sequence_logps(model, b["kl_input_ids"], b["kl_attention_mask"], b["kl_completion_mask"])
    return lp, kl


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_logps_and_grads_equal_padded(tok, arch, share_prompt):
    model = MODELS[arch](tok)
    data = _data(tok)
    plan = make_plan(len(data), 5, seed=2)
    for mb in plan.microbatches:
        lp, kl = _padded(model, data, mb, plan, tok.pad_token_id)
        lp.sum().backward()
        g_pad = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        with packed_attention(model):
            plp, pkl = packed_sequence_logps(model, pack_examples(data, mb, plan, share_prompt=share_prompt),
                                             chunk_size=7)
        assert not pkl.requires_grad
        torch.testing.assert_close(plp, lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pkl, kl, rtol=1e-5, atol=1e-5)
        plp.sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, g_pad[n], rtol=1e-4, atol=1e-6, msg=n)
        model.zero_grad()
    assert model.config._attn_implementation != ATTN_NAME  # switched back


def test_truncated_kl_pairs_and_flex_backend(tok):
    """max_length cuts KL completions (some to nothing); flex (forward-only on CPU) agrees too."""
    model = _qwen2(tok, seed=4)
    data = _data(tok, n=12, max_length=12)
    plan = make_plan(len(data), 4, seed=1)
    for mb in plan.microbatches:
        with torch.no_grad():
            lp, kl = _padded(model, data, mb, plan, tok.pad_token_id, max_length=12)
            for backend in ("sdpa", "flex"):
                for share in (True, False):
                    with packed_attention(model):
                        plp, pkl = packed_sequence_logps(
                            model, pack_examples(data, mb, plan, 12, share_prompt=share), backend=backend)
                    torch.testing.assert_close(plp, lp, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(pkl, kl, rtol=1e-5, atol=1e-5)


def test_pack_layout(tok):
    data = _data(tok)
    plan = make_plan(len(data), 3, seed=0, shuffle=False)
    mb = plan.microbatches[0]
    pk = pack_examples(data, mb, plan, share_prompt=True)
    lens = [len(data[i].prompt_ids) + len(data[i].completion_ids) for i in mb]
    assert pk["cu_list"] == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert pk["position_ids"][0, lens[0]].item() == 0  # positions restart per sequence
    assert pk["n_tokens"] == sum(lens) and len(pk["targets"]) == sum(len(data[i].completion_ids) for i in mb)
    # shared prompt: the KL forward holds only the partners' completions
    assert pk["kl_input_ids"].shape[1] == sum(len(data[plan.partner[i]].completion_ids) for i in mb)
    assert pk["kl_tokens"] == sum(len(data[i].prompt_ids) + len(data[plan.partner[i]].completion_ids) for i in mb)


def test_unpacked_calls_still_work_while_switched(tok):
    """Padded forwards (evaluation, generation) go through SDPA unchanged while switched."""
    model = toy.make_model(tok, seed=1)
    data = _data(tok)
    plan = make_plan(len(data), 4, seed=0)
    b = collate_microbatch(data, plan.microbatches[0], plan, tok.pad_token_id)
    with torch.no_grad():
        want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        with packed_attention(model):
            got = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want)


def test_auto_settings_on_cpu():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert resolve_packing(KTOTrainConfig(), torch.device("cpu")) is False
    assert resolve_packing(KTOTrainConfig(), torch.device("cuda")) is True
    assert resolve_packing(KTOTrainConfig(packing=True), torch.device("cpu")) is True
    with pytest.raises(ValueError):
        resolve_backend("nope", torch.device("cpu"), torch.float32)


def _cfg(**kw):
    base = dict(beta=0.1, learning_rate=3e-3, microbatch_size=4, grad_accum_steps=2, max_steps=5, warmup_steps=1,
                lr_scheduler="cosine", max_grad_norm=1.0, seed=3, max_length=24, save_final=False)
    base.update(kw)
    return KTOTrainConfig(**base)


def _same_run(a, b, atol=2e-5):
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history]
    for x, y in zip(a.history, b.history):
        for key in ("loss", "kl", "rewards/chosen", "logps/chosen", "grad_norm"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=atol), key
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-4


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_packed_training_trajectory_equals_padded(tok, tmp_path, arch, monkeypatch):
    import worker.kto.reference as reference_mod
    import worker.kto.trainer as trainer_mod

    calls = []
    real = trainer_mod.packed_sequence_logps

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "packed_sequence_logps", spy)
    monkeypatch.setattr(reference_mod, "packed_sequence_logps", spy)
    rows = toy.make_feedback(40, desirable_fraction=0.4, seed=6)
    base = MODELS[arch](tok)
    runs = {}
    for packing, share in ((False, True), (True, True), (True, False)):
        runs[(packing, share)] = train_kto(_cfg(packing=packing, share_prompt_kv=share), copy.deepcopy(base), rows,
                                           tmp_path / f"{packing}-{share}", tokenizer=tok)
    padded = runs[(False, True)]
    assert len(calls) == 2 * (10 + 5 * 2)  # two packed runs: 10 reference microbatches + 5 steps x 2 microbatches
    assert padded.history[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # step 1: policy == reference
    assert max(h["loss"] for h in padded.history) - min(h["loss"] for h in padded.history) > 1e-3  # it trained
    for key in ((True, True), (True, False)):
        _same_run(runs[key], padded)
        assert runs[key].model.config._attn_implementation != ATTN_NAME


def test_packed_live_reference_lora_and_checkpointing(tok, tmp_path):
    """The other forward schedules: a live π_ref model, LoRA's adapter-disabled π_ref, gradient
    checkpointing (recomputed packed forwards), all equal to their padded runs."""
    rows = toy.make_feedback(24, desirable_fraction=0.5, seed=7)
    base = toy.make_model(tok, seed=2)
    from worker.kto.trainer import LoraSettings

    for extra in (dict(precompute_reference=False), dict(lora=LoraSettings(r=4, alpha=8), learning_rate=1e-2),
                  dict(gradient_checkpointing=True, grad_accum_steps=1)):
        a = train_kto(_cfg(packing=False, max_steps=3, **extra), copy.deepcopy(base), rows, tmp_path / "a", tokenizer=tok,
                      resume=False)
        b = train_kto(_cfg(packing=True, max_steps=3, **extra), copy.deepcopy(base), rows, tmp_path / "b", tokenizer=tok,
                      resume=False)
        assert a.step == b.step == 3
        _same_run(a, b)  # asserts equal losses, log-probs and weights


def test_self_check_accepts_exact_and_rejects_wrong_kernels(monkeypatch):
    """The one-off CUDA self-check, exercised on CPU with stand-in kernels: an exact one is
    chosen, one that ignores the causal mask or the bottom-right alignment is not."""
    import torch.nn.functional as F

    from worker.kto import packing

    def non_causal(q, k, v, ctx, scale):
        outs = []
        for s in range(len(ctx.cu_q_list) - 1):
            a, b, c, d = ctx.cu_q_list[s], ctx.cu_q_list[s + 1], ctx.cu_k_list[s], ctx.cu_k_list[s + 1]
            qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q[a:b], k[c:d], v[c:d]))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)[0].transpose(0, 1))
        return torch.cat(outs)

    def top_left(q, k, v, ctx, scale):  # causal, but aligned to the start of the keys
        outs = []
        for s in range(len(ctx.cu_q_list) - 1):
            a, b, c, d = ctx.cu_q_list[s], ctx.cu_q_list[s + 1], ctx.cu_k_list[s], ctx.cu_k_list[s + 1]
            qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q[a:b], k[c:d], v[c:d]))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                       enable_gqa=True)[0].transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setattr(packing, "_varlen_fn", lambda: None)  # CPU: no FlashAttention candidate
    cpu = torch.device("cpu")
    for fn, square, br in ((packing.attention_sdpa_loop, "flex", "flex"), (non_causal, None, None),
                           (top_left, "flex", None)):
        monkeypatch.setattr(packing, "attention_flex", fn)
        assert packing._run_self_check(cpu, torch.float32, bottom_right=False) == square, fn
        assert packing._run_self_check(cpu, torch.float32, bottom_right=True) == br, fn


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("share_prompt", [True, False])
def test_bucketed_packs_change_no_number(tok, arch, share_prompt):
    """bucket_pack pads every token and target count up to a multiple of the bucket (so that CUDA
    graphs see few shapes): the per-example log-probs, the KL pairs' and the gradients are the
    unpadded pack's, with truncated pairs (some KL completions cut to nothing) as well."""
    from worker.kto.packing import bucket_pack

    model = MODELS[arch](tok)
    data = _data(tok, n=12, max_length=14)
    plan = make_plan(len(data), 4, seed=1)
    for mb in plan.microbatches:
        exact = pack_examples(data, mb, plan, 14, share_prompt=share_prompt)
        with packed_attention(model):
            lp, kl = packed_sequence_logps(model, exact, chunk_size=5)
            lp.sum().backward()
            want = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            padded = bucket_pack(exact, 8, max_length=14)
            plp, pkl = packed_sequence_logps(model, padded, chunk_size=5)
            plp.sum().backward()
        for key in ("input_ids", "targets", "kl_input_ids", "kl_targets"):
            assert padded[key].shape[-1] % 8 == 0, key
        assert padded["max_seqlen"] == padded["kl_max_q"] == 14 and padded["kl_max_k"] >= 14
        torch.testing.assert_close(plp, lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pkl, kl, rtol=1e-5, atol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)
        model.zero_grad()


def test_bucketed_packs_share_shapes_and_work_with_flex(tok):
    """Microbatches of different lengths fall into the same padded shapes (one graph serves
    them), and the FlexAttention path reads the padded layout right too."""
    from worker.kto.graphed import graph_signature
    from worker.kto.packing import bucket_pack

    model = _qwen2(tok, seed=4)
    data = _data(tok, n=12, max_length=14)
    plan = make_plan(len(data), 4, seed=1)
    exact = [pack_examples(data, mb, plan, 14) for mb in plan.microbatches]
    assert len({graph_signature(p) for p in exact}) > 1
    padded = [bucket_pack(p, 64, max_length=14) for p in exact]
    assert len({graph_signature(p) for p in padded}) == 1
    with torch.no_grad(), packed_attention(model):
        for e, p in zip(exact, padded):
            lp, kl = packed_sequence_logps(model, e, backend="sdpa")
            plp, pkl = packed_sequence_logps(model, p, backend="flex")
            torch.testing.assert_close(plp, lp, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pkl, kl, rtol=1e-5, atol=1e-5)


def test_bucketed_training_trajectory_equals_unbucketed(tok, tmp_path):
    """pack_bucket pads training packs and the reference scoring alike; the run is the same."""
    rows = toy.make_feedback(40, desirable_fraction=0.4, seed=6)
    base = _qwen2(tok, seed=5)
    plain = train_kto(_cfg(packing=True), copy.deepcopy(base), rows, tmp_path / "plain", tokenizer=tok)
    bucketed = train_kto(_cfg(packing=True, pack_bucket=16), copy.deepcopy(base), rows, tmp_path / "bucketed",
                         tokenizer=tok)
    assert bucketed.history[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert [h["tokens_per_s"] > 0 for h in bucketed.history] == [True] * 5
    _same_run(bucketed, plain)
    for bad in (-16, 24):
        with pytest.raises(ValueError, match="multiple of 16"):
            train_kto(_cfg(packing=True, pack_bucket=bad), copy.deepcopy(base), rows, tmp_path / "bad", tokenizer=tok)


def test_bucketed_shapes_ignore_dropped_pairs_and_unbounded_lengths():
    """A KL pair that truncation dropped comes back as an empty segment, and without max_length
    the longest-sequence bounds are rounded to the bucket: neither changes the padded shapes."""
    from worker.kto.data import Plan, TokenizedExample
    from worker.kto.graphed import graph_signature
    from worker.kto.packing import bucket_pack

    # pair (0 -> 1) keeps a completion token under max_length 6; pair (2 -> 3) has a 6-token prompt and drops
    a = [TokenizedExample([1, 2, 3], [4, 5], True), TokenizedExample([6, 7, 8], [9, 10], False)] * 2
    b = [TokenizedExample([1, 2, 3], [4, 5], True), TokenizedExample([6, 7, 8], [9, 10], False),
         TokenizedExample([1, 2, 3, 4, 5, 6], [7], True), TokenizedExample([8], [9], False)]
    plan = Plan(microbatches=[[0, 1, 2, 3]], partner=[1, 0, 3, 2], seed=0)
    pa, pb = (pack_examples(d, [0, 1, 2, 3], plan, 6) for d in (a, b))
    assert len(pa["kl_cu_q_list"]) != len(pb["kl_cu_q_list"])  # b lost a pair
    ba, bb = (bucket_pack(p, 16, max_length=6) for p in (pa, pb))
    assert len(ba["kl_cu_q_list"]) == len(bb["kl_cu_q_list"]) == 4 + 2
    assert graph_signature(ba) == graph_signature(bb)
    # the same totals (45 tokens, so the same 64-token buckets), longest sequence 30 against 12
    long = [TokenizedExample(list(range(1, 21)), list(range(21, 31)), True)] + [
        TokenizedExample([1, 2, 3], [4, 5], i % 2 == 0) for i in range(3)]
    short = [TokenizedExample(list(range(1, 7)), list(range(7, 13)), i % 2 == 0) for i in range(1)] + [
        TokenizedExample(list(range(1, 7)), list(range(7, 12)), i % 2 == 0) for i in range(3)]
    plan2 = Plan(microbatches=[[0, 1, 2, 3]], partner=[1, 0, 3, 2], seed=0)
    pl, ps = (pack_examples(d, [0, 1, 2, 3], plan2) for d in (long, short))
    assert (pl["n_tokens"], pl["max_seqlen"]) == (45, 30) and (ps["n_tokens"], ps["max_seqlen"]) == (45, 12)
    sl, ss = bucket_pack(pl, 64), bucket_pack(ps, 64)
    assert sl["max_seqlen"] == ss["max_seqlen"] == 64 and sl["kl_max_k"] == ss["kl_max_k"] == 128
    assert graph_signature(sl) == graph_signature(ss)
    assert bucket_pack(pl, 16)["max_seqlen"] == 32  # a longest sequence past the bucket: rounded up to it
