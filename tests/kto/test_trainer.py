import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from worker.kto import toy
from worker.kto.trainer import KTOTrainConfig, latest_checkpoint, train_kto, verify_manifest

KEYS = {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
        "grad_norm", "lr", "tokens_per_s", "examples_seen", "step"}


def _cfg(**kw):
    base = dict(beta=0.1, learning_rate=3e-3, microbatch_size=4, grad_accum_steps=2, num_epochs=2,
                warmup_steps=1, lr_scheduler="cosine", max_grad_norm=1.0, seed=3, max_length=32)
    base.update(kw)
    return KTOTrainConfig(**base)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_matches_uninterrupted_run(toy_dir, tmp_path):
    rows = toy.make_feedback(40, desirable_fraction=0.3, seed=1)  # 10 microbatches, 5 steps/epoch, 10 steps
    full = train_kto(_cfg(), toy_dir, rows, tmp_path / "full")
    assert full.status == "completed" and full.step == 10

    stop_after = 4
    seen = []
    ev = threading.Event()

    def cb(m):
        seen.append(m)
        if m["step"] == stop_after:
            ev.set()

    part = train_kto(_cfg(save_every_steps=3), toy_dir, rows, tmp_path / "resumed", callback=cb, should_stop=ev)
    assert part.status == "cancelled" and part.step == stop_after
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000004"  # saved on cancel
    assert KEYS <= set(seen[-1])
    assert seen[-1]["examples_seen"] == stop_after * 8

    rest = train_kto(_cfg(save_every_steps=3), toy_dir, rows, tmp_path / "resumed")
    assert rest.status == "completed" and rest.step == 10 and rest.examples_seen == full.examples_seen
    a, b = _params(full.model), _params(rest.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # the metrics after resuming equal the uninterrupted run's
    assert rest.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], abs=0)
    # final folder: valid manifest, loadable weights equal to the in-memory model
    assert verify_manifest(rest.final_dir)
    sd = load_file(rest.final_dir / "model.safetensors")
    torch.testing.assert_close(sd["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    # keep_checkpoints=2 prunes older ones
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("step-*"))) <= 2


def test_manifest_contents_and_tamper_detection(toy_dir, tmp_path):
    rows = toy.make_feedback(12, desirable_fraction=0.5, seed=2)
    res = train_kto(_cfg(num_epochs=1, grad_accum_steps=1, lambda_d=1.5), toy_dir, rows, tmp_path / "o")
    man = json.loads((res.final_dir / "manifest.json").read_text())
    assert man["format"] == "prospect.checkpoint/v1" and man["kind"] == "full"
    assert man["hyperparameters"]["lambda_d"] == 1.5 and man["data"]["n_kept"] == 12
    assert man["reference_id"].startswith("sha256:")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(man["files"])
    assert all(len(h) == 64 for h in man["files"].values())
    assert not list(tmp_path.glob("o/**/.tmp-*"))  # no temporary folder left behind
    assert verify_manifest(res.final_dir)
    with open(res.final_dir / "config.json", "a") as fh:
        fh.write(" ")
    assert not verify_manifest(res.final_dir)


def test_cancel_before_first_step(toy_dir, tmp_path):
    res = train_kto(_cfg(), toy_dir, toy.make_feedback(8, seed=0), tmp_path / "c", should_stop=lambda: True)
    assert res.status == "cancelled" and res.step == 0 and res.final_dir is None


def test_live_reference_equals_precomputed(toy_dir, tmp_path):
    rows = toy.make_feedback(16, desirable_fraction=0.5, seed=4)
    a = train_kto(_cfg(num_epochs=1), toy_dir, rows, tmp_path / "a")
    b = train_kto(_cfg(num_epochs=1, precompute_reference=False), toy_dir, rows, tmp_path / "b")
    for x, y in zip(a.history, b.history):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["kl"] == pytest.approx(y["kl"], rel=1e-4, abs=1e-6)


def test_microbatch_size_one_and_gradient_checkpointing(toy_dir, tmp_path):
    rows = toy.make_feedback(6, desirable_fraction=0.5, seed=5)
    res = train_kto(_cfg(microbatch_size=1, grad_accum_steps=2, num_epochs=1, gradient_checkpointing=True,
                         use_reference_point=True), toy_dir, rows, tmp_path / "g")
    assert res.step == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)


def test_liger_resolution():
    from worker.kto.packing import liger_available
    from worker.kto.trainer import KTOTrainConfig, resolve_liger

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_liger(KTOTrainConfig(liger_kernels=True), cpu) is False  # CUDA kernels only
    assert resolve_liger(KTOTrainConfig(liger_kernels=True), cuda) is True
    assert resolve_liger(KTOTrainConfig(liger_kernels=False), cuda) is False
    assert resolve_liger(KTOTrainConfig(), cuda) is liger_available()  # "auto"
    # torch.compile cannot trace Liger's functions (seen on an H100, torch 2.11): compile wins
    assert resolve_liger(KTOTrainConfig(liger_kernels=True, compile_layers=True), cuda) is False
    with pytest.raises(ValueError, match="liger_kernels"):
        resolve_liger(KTOTrainConfig(liger_kernels="yes"), cuda)


def _kl_history(folder, policy, rows, tok, ref=None, **kw) -> list[float]:
    import copy

    cfg = KTOTrainConfig(**{**dict(microbatch_size=4, max_steps=2, learning_rate=0.0, save_final=False, seed=0,
                                   shuffle=False), **kw})
    res = train_kto(cfg, copy.deepcopy(policy), rows, folder, tokenizer=tok, resume=False,
                    **({"reference": copy.deepcopy(ref), "reference_name": "ref-A"} if ref is not None else {}))
    return [h["kl"] for h in res.history]


def test_a_reference_table_without_the_kl_column_is_not_reused(tmp_path):
    """The cached π_ref table was keyed by the data alone: a packed run without the reference
    point (its KL column all zeros) left a table that a later run in the same folder reused,
    silently switching its reference point off (a helper's review)."""
    tok = toy.make_tokenizer()
    rows = toy.make_feedback(16, desirable_fraction=0.5, seed=3)
    policy, ref = toy.make_model(tok, seed=0), toy.make_model(tok, seed=5)
    toy.sft_base_model(policy, tok, steps=30, seed=1)  # π_θ far from π_ref: z0 > 0 at step 1
    kw = dict(packing=True, attn_backend="sdpa", max_length=64)
    fresh = _kl_history(tmp_path / "fresh", policy, rows, tok, ref, **kw)
    assert fresh[0] > 0
    _kl_history(tmp_path / "shared", policy, rows, tok, ref, use_reference_point=False, **kw)
    assert _kl_history(tmp_path / "shared", policy, rows, tok, ref, **kw) == pytest.approx(fresh, rel=1e-6)


def test_a_reference_table_of_other_truncation_is_not_reused(tmp_path):
    """max_length truncates the KL pairs (x_i, y_j) after tokenizing: a table scored without it
    was reused by a run with it (no single example truncated, so the data looked the same)."""
    tok = toy.make_tokenizer()
    rows = [{"prompt": "a" * 19, "completion": "1", "label": True} if i % 2 == 0 else
            {"prompt": "b", "completion": "2" * 19, "label": False} for i in range(8)]  # KL pairs: 40 tokens
    policy = toy.make_model(tok, seed=0)
    fresh = _kl_history(tmp_path / "fresh", policy, rows, tok, max_length=24)
    _kl_history(tmp_path / "shared", policy, rows, tok, max_length=None)
    assert _kl_history(tmp_path / "shared", policy, rows, tok, max_length=24) == pytest.approx(fresh, abs=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_dropout_is_off_so_step_one_rewards_are_zero(tmp_path, packing):
    """π_ref is scored without dropout; the policy trained with it, so at step 1, where the two
    are the same weights, the rewards were dropout noise instead of 0 (a helper's review; TRL's
    KTOTrainer disables dropout by default). GPT-2 keeps its dropout in nn.Dropout modules,
    Llama-style models as a float attention_dropout; both are zeroed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from worker.kto.trainer import disable_dropout

    tok = toy.make_tokenizer()
    rows = toy.make_feedback(16, desirable_fraction=0.5, seed=3)

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    def step_one(keep_dropout: bool) -> dict:
        cfg = _cfg(microbatch_size=8, max_steps=1, num_epochs=1, grad_accum_steps=1, learning_rate=1e-3,
                   save_final=False, max_length=64, packing=packing, attn_backend="sdpa",
                   disable_dropout=not keep_dropout)
        return train_kto(cfg, gpt2(), rows, tmp_path / f"d{keep_dropout}", tokenizer=tok, resume=False).history[0]

    off = step_one(keep_dropout=False)
    assert off["rewards/chosen"] == 0.0 and off["rewards/rejected"] == 0.0
    if packing:  # the packed attention has no dropout: asked for, it says so instead of ignoring it
        with pytest.raises(NotImplementedError, match="disable_dropout"):
            step_one(keep_dropout=True)
    else:
        assert step_one(keep_dropout=True)["rewards/chosen"] != 0.0  # what it was: noise

    llama = toy.make_model(tok, seed=0)
    llama.config.attention_dropout = 0.1
    for layer in llama.model.layers:
        layer.self_attn.attention_dropout = 0.1
    assert disable_dropout(llama) == len(llama.model.layers)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in llama.model.layers)
    assert llama.config.attention_dropout == 0.1  # the saved config keeps its rate

    # OPT keeps every rate as a float `dropout` for nn.functional.dropout: a training-mode forward
    # equals the eval one once they are zeroed
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=64, dropout=0.3,
                                   attention_dropout=0.3))
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        reference = opt.eval()(input_ids=ids).logits
        assert not torch.equal(opt.train()(input_ids=ids).logits, reference)  # dropout on
        assert disable_dropout(opt) > 0
        torch.testing.assert_close(opt.train()(input_ids=ids).logits, reference, rtol=0, atol=0)


def test_each_example_is_trained_once_an_epoch_with_gradient_accumulation(toy_dir, tmp_path):
    """10 examples in microbatches of 4 (4 + 4 + 2) with 2 accumulated per step: the epoch's
    second step wrapped around to the first microbatch, which was trained twice an epoch
    (examples_seen 14; a helper's review). Now the last step accumulates only what is left."""
    rows = toy.make_feedback(10, desirable_fraction=0.5, seed=2)
    seen = []
    res = train_kto(_cfg(num_epochs=2, shuffle=False), toy_dir, rows, tmp_path / "o",
                    callback=lambda m: seen.append(m["examples_seen"]))
    assert res.step == 4 and res.examples_seen == 20
    assert seen == [8, 10, 18, 20]


def test_a_model_scored_unlike_its_own_forward_stops_before_the_first_step(toy_dir, tmp_path, monkeypatch):
    from worker.kto import logprobs

    monkeypatch.setattr(logprobs, "_logit_transform", lambda config: (3.0, None))  # a transform it got wrong
    with pytest.raises(ValueError, match="does not reproduce"):
        train_kto(_cfg(), toy_dir, toy.make_feedback(8, seed=0), tmp_path / "o")
    assert latest_checkpoint(tmp_path / "o") is None


def test_a_file_the_manifest_does_not_list_fails_verification(tmp_path):
    """write_manifest hashes every file of the folder, but verify_manifest only checked the files
    listed: a file added afterwards (an adapter_config.json, a second weight shard, a chat
    template: each changes what from_pretrained loads) still verified, and so did a manifest
    without its file list."""
    from worker.kto.trainer import write_manifest

    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "tokenizer.json").write_text("{}")
    write_manifest(folder, {"kind": "full"})
    assert verify_manifest(folder)
    (folder / "adapter_config.json").write_text("{}")
    assert not verify_manifest(folder)
    (folder / "adapter_config.json").unlink()
    (folder / "sub" / "chat_template.jinja").write_text("x")
    assert not verify_manifest(folder)
    (folder / "sub" / "chat_template.jinja").unlink()
    assert verify_manifest(folder)
    man = json.loads((folder / "manifest.json").read_text())
    del man["files"]
    (folder / "manifest.json").write_text(json.dumps(man))
    assert not verify_manifest(folder)


def test_a_fresh_run_keeps_its_checkpoints_beside_a_longer_earlier_run(toy_dir, tmp_path):
    """keep_checkpoints kept the highest step numbers in the folder: a run started over with
    resume=False where an earlier run had saved later steps deleted each checkpoint it wrote at
    once (its cancel returned a last_checkpoint that no longer existed), and a later resume
    continued from the earlier run's step instead of this run's."""
    rows = toy.make_feedback(24, desirable_fraction=0.5, seed=1)
    out = tmp_path / "o"
    train_kto(_cfg(max_steps=9, save_every_steps=4, grad_accum_steps=1, save_final=False), toy_dir, rows, out)
    assert latest_checkpoint(out).name == "step-00000008"
    ev = threading.Event()
    res = train_kto(_cfg(max_steps=6, save_every_steps=2, grad_accum_steps=1, seed=5, save_final=False), toy_dir,
                    rows, out, resume=False, callback=lambda m: m["step"] == 3 and ev.set(), should_stop=ev)
    assert res.status == "cancelled" and res.step == 3
    assert res.last_checkpoint.is_dir() and latest_checkpoint(out) == res.last_checkpoint
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]


def test_a_resume_with_other_settings_or_data_is_refused(toy_dir, tmp_path):
    """The newest checkpoint was resumed whatever the run's settings: with another microbatch
    size (fewer steps in all) a run 'completed' at once without a step on its settings; another
    learning rate or other data continued the first run's optimizer, step and data position.
    Speed, memory and checkpoint settings may change."""
    rows = toy.make_feedback(24, desirable_fraction=0.5, seed=1)
    out = tmp_path / "o"
    base = dict(num_epochs=1, grad_accum_steps=1, save_final=False)
    ev = threading.Event()
    part = train_kto(_cfg(save_every_steps=2, **base), toy_dir, rows, out,
                     callback=lambda m: m["step"] == 4 and ev.set(), should_stop=ev)
    assert part.status == "cancelled" and part.step == 4
    for changed, kw, data in (("microbatch_size", dict(microbatch_size=6), rows),
                              ("learning_rate", dict(learning_rate=1e-5), rows),
                              ("data", {}, toy.make_feedback(24, desirable_fraction=0.5, seed=2))):
        with pytest.raises(ValueError, match=changed):
            train_kto(_cfg(**{**base, **kw}), toy_dir, data, out)
    rest = train_kto(_cfg(save_every_steps=5, keep_checkpoints=1, logits_chunk_size=7, **base), toy_dir, rows, out)
    assert rest.status == "completed" and rest.step == 6 and len(rest.history) == 2


def test_a_reference_table_of_another_unnamed_model_is_not_reused(tmp_path):
    """A model passed loaded, without a folder or id (empty _name_or_path), gave π_ref no name:
    the cached table's key was the data alone, so a second such model trained in the same folder
    used the first model's table (step-1 rewards not 0, though policy and π_ref were the same)."""
    tok = toy.make_tokenizer()
    rows = toy.make_feedback(16, desirable_fraction=0.5, seed=3)
    cfg = _cfg(max_steps=1, grad_accum_steps=1, save_final=False)
    for seed in (1, 2):
        first = train_kto(cfg, toy.make_model(tok, seed=seed), rows, tmp_path / "o", tokenizer=tok, resume=False)
        assert first.history[0]["rewards/chosen"] == 0.0 and first.history[0]["rewards/rejected"] == 0.0, seed
