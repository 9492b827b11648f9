import json

import torch
from transformers import AutoModelForCausalLM

from worker.kto import toy
from worker.kto.data import collate_microbatch, make_plan, tokenize_examples
from worker.kto.logprobs import sequence_logps
from worker.kto.reference import precompute_reference_logps
from worker.kto.trainer import KTOTrainConfig, LoraSettings, train_kto, verify_manifest


def test_lora_trains_writes_adapter_and_merged_copy(toy_dir, tok, tmp_path):
    rows = toy.make_feedback(16, desirable_fraction=0.5, seed=3)
    cfg = KTOTrainConfig(learning_rate=5e-3, microbatch_size=4, num_epochs=2, max_length=32,
                         lora=LoraSettings(r=4, alpha=8))
    res = train_kto(cfg, toy_dir, rows, tmp_path / "out")
    assert res.status == "completed" and res.step == 8
    assert (res.adapter_dir / "adapter_model.safetensors").exists() and verify_manifest(res.adapter_dir)
    assert verify_manifest(res.final_dir)
    man = json.loads((res.final_dir / "manifest.json").read_text())
    assert man["kind"] == "merged" and man["reference_mode"] == "adapter_disabled"

    base = AutoModelForCausalLM.from_pretrained(toy_dir)
    merged = AutoModelForCausalLM.from_pretrained(res.final_dir)
    data, _ = tokenize_examples(rows, tok)
    plan = make_plan(len(data), 4)
    b = collate_microbatch(data, list(range(len(data))), plan, tok.pad_token_id)
    a = (b["input_ids"], b["attention_mask"], b["completion_mask"])
    with torch.no_grad():
        lp_base, lp_merged, lp_mem = sequence_logps(base, *a), sequence_logps(merged, *a), sequence_logps(res.model, *a)
    assert (lp_merged - lp_base).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(lp_merged, lp_mem, rtol=1e-5, atol=1e-5)  # merged copy == trained model

    # the adapter folder loads with peft on top of the base, and equals the merged copy
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_dir), res.adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(peft_model, *a), lp_merged, rtol=1e-5, atol=1e-5)
        # reference via the disabled adapter == the base model's log-probs
        ref, ref_kl = precompute_reference_logps(peft_model, data, plan, tok.pad_token_id, adapter_disabled=True)
    torch.testing.assert_close(ref, lp_base, rtol=1e-5, atol=1e-5)
    # the trainer's cached reference table was made the same way (adapter disabled, before training)
    table = torch.load(tmp_path / "out" / "reference_logps.pt")
    torch.testing.assert_close(table["ref"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(table["ref_kl"], ref_kl, rtol=1e-5, atol=1e-5)


def test_lora_resume_matches_uninterrupted(toy_dir, tmp_path):
    rows = toy.make_feedback(16, desirable_fraction=0.5, seed=6)
    cfg = KTOTrainConfig(learning_rate=5e-3, microbatch_size=4, num_epochs=2, max_length=32, seed=2,
                         lora=LoraSettings(r=4, alpha=8), save_final=False)
    full = train_kto(cfg, toy_dir, rows, tmp_path / "full")
    part = train_kto(cfg, toy_dir, rows, tmp_path / "res", should_stop=lambda: part_steps[0] >= 3,
                     callback=lambda m: part_steps.__setitem__(0, m["step"])) if (part_steps := [0]) else None
    assert part.status == "cancelled" and part.step == 3
    rest = train_kto(cfg, toy_dir, rows, tmp_path / "res")
    assert rest.step == 8
    a, b = full.model.state_dict(), rest.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
