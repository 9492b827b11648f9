"""Parity with TRL 1.16's KTOTrainer (loss_type="kto"), a test-only dependency.

Same toy model and data, same β/λ/lr/AdamW/clipping, TRL's KL microbatches (sequential
microbatches, completions rotated by one: ``shuffle=False`` here). Compared: per-example
reference log-probs (and the KL pairs'), the loss of every step (exact values TRL computed,
captured from its compute_loss), z0 per step, and the parameters + per-example policy log-probs
after several optimizer steps.
"""

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from worker.kto import toy  # noqa: E402
from worker.kto.data import collate_microbatch, make_plan, tokenize_examples  # noqa: E402
from worker.kto.logprobs import sequence_logps  # noqa: E402
from worker.kto.trainer import KTOTrainConfig, train_kto  # noqa: E402

N, MB, STEPS = 24, 4, 6
BETA, LD, LU, LR = 0.1, 1.33, 1.0, 2e-3


@pytest.mark.parametrize("chat,frac,own_ref", [(False, 0.4, False), (True, 0.4, False), (False, 0.7, True)])
def test_matches_trl_kto_trainer(tmp_path, chat, frac, own_ref):
    from trl import KTOConfig, KTOTrainer

    tok = toy.make_tokenizer()
    base = toy.make_model(tok, seed=7)
    ref_model = copy.deepcopy(base)
    toy.sft_base_model(base, tok, steps=20, seed=1)  # not a random init: logps are meaningful
    if own_ref:  # a π_ref that is not the starting policy: z0 > 0 from the first step
        toy.sft_base_model(ref_model, tok, steps=4, seed=2)
    else:
        ref_model = copy.deepcopy(base)
    rows = toy.make_feedback(N, desirable_fraction=frac, seed=11, chat=chat)

    # ---------------- TRL
    args = KTOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=MB, max_steps=STEPS, learning_rate=LR,
        beta=BETA, desirable_weight=LD, undesirable_weight=LU, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0, max_length=None, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, precompute_ref_log_probs=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, gradient_accumulation_steps=1,
        bf16=False,  # KTOConfig defaults to bf16, even on CPU: compare in float32
    )
    trl_rows = [dict(r, completion=[{"role": "assistant", "content": r["completion"]}]) for r in rows] if chat else rows
    trl_model = copy.deepcopy(base)
    trainer = KTOTrainer(model=trl_model, ref_model=copy.deepcopy(ref_model), args=args,
                         train_dataset=datasets.Dataset.from_list(trl_rows), processing_class=tok)
    trl_losses, trl_kl = [], []
    orig = trainer.compute_loss

    def recording(*a, **k):
        out = orig(*a, **k)
        trl_losses.append(out.detach().item())
        trl_kl.append(trainer._metrics["train"]["kl"][-1])
        return out

    trainer.compute_loss = recording
    trainer.train()
    trl_ds = trainer.train_dataset
    assert len(trl_losses) == STEPS

    # ---------------- Prospect
    cfg = KTOTrainConfig(beta=BETA, lambda_d=LD, lambda_u=LU, learning_rate=LR, lr_scheduler="constant",
                         weight_decay=0.0, max_grad_norm=1.0, microbatch_size=MB, max_steps=STEPS,
                         shuffle=False, max_length=None, seed=0)
    ours = train_kto(cfg, copy.deepcopy(base), rows, tmp_path / "ours", tokenizer=tok,
                     reference=copy.deepcopy(ref_model) if own_ref else None)
    ref_table = torch.load(tmp_path / "ours" / "reference_logps.pt")

    # same tokens, same KL pairs
    data, _ = tokenize_examples(rows, tok)
    plan = make_plan(len(data), MB, shuffle=False)
    assert [d.prompt_ids for d in data] == trl_ds["prompt_ids"]
    assert [d.completion_ids for d in data] == trl_ds["completion_ids"]
    assert [data[plan.partner[i]].completion_ids for i in range(N)] == trl_ds["KL_completion_ids"]

    # per-example reference log-probs
    torch.testing.assert_close(ref_table["ref"], torch.tensor(trl_ds["ref_logps"]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref_table["ref_kl"], torch.tensor(trl_ds["ref_KL_logps"]), rtol=1e-5, atol=1e-4)

    # every step's loss and z0 (step 1: policy == reference; later steps are what matters)
    our_losses = [h["loss"] for h in ours.history]
    our_kl = [h["kl"] for h in ours.history]
    print("\nloss  trl:", [round(x, 6) for x in trl_losses], "\nloss ours:", [round(x, 6) for x in our_losses])
    assert our_losses == pytest.approx(trl_losses, rel=1e-4, abs=1e-6)
    print("z0 trl:", trl_kl, "\nz0 ours:", our_kl)
    assert our_kl == pytest.approx(trl_kl, rel=1e-3, abs=1e-5)
    assert max(trl_losses) - min(trl_losses) > 1e-3  # the loss did move (and so did the parameters, below)
    if own_ref:
        assert min(trl_kl) > 0.1  # the z0 path is exercised, not just its clamp

    # parameters and per-example policy log-probs after STEPS optimizer steps
    trl_sd, our_sd = trainer.model.state_dict(), ours.model.state_dict()
    max_diff = max((trl_sd[k].float() - our_sd[k].float()).abs().max().item() for k in our_sd)
    moved = max((base.state_dict()[k] - our_sd[k]).abs().max().item() for k in our_sd)
    print(f"max |θ_trl − θ_ours| = {max_diff:.2e}  (max update {moved:.2e})")
    assert max_diff < 1e-4 and moved > 1e-3  # Adam amplifies float32 rounding a little
    b = collate_microbatch(data, list(range(N)), plan, tok.pad_token_id)
    args_ = (b["input_ids"], b["attention_mask"], b["completion_mask"])
    with torch.no_grad():
        lp_ours = sequence_logps(ours.model, *args_)
        labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
        lp_trl = trainer.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels,
                               fused_lm_head=True).log_probs.sum(-1)
    torch.testing.assert_close(lp_ours, lp_trl, rtol=1e-4, atol=1e-4)
