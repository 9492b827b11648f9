"""Registered checkpoints are plain Hugging Face folders: AutoModelForCausalLM loads a full
(or merged LoRA) checkpoint, peft's PeftModel loads the adapter on top of the job's π_ref, and
both generate; the serving call names the folder to load."""

from __future__ import annotations

import random

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.references import get_snapshot
from service.registry import get_checkpoint
from tests.registry.test_gate import _good_feedback
from worker.kto.evaluate import generate


def test_registered_checkpoints_load_and_generate(make_lab):
    lab = make_lab()
    lab.ingest(_good_feedback(lab, 300, random.Random(5), "default-base"))
    full = lab.gate(lab.train())
    lora = lab.gate(lab.train(new_data_only=False, lora=True, lora_r=4, learning_rate=5e-3, max_steps=4))
    assert full["stage"] == "candidate" and full["format"] == "full"
    assert lora["format"] == "lora" and lora["adapter_path"] and lora["artifact_path"]
    prompts = ["3+4=", "9+9="]

    # the serving call hands out the folder, which loads as it is
    r = lab.client.post(f"/v1/checkpoints/{full['id']}/promote", json={"stage": "production"},
                        headers=lab.env.headers("admin"))
    assert r.status_code == 200
    served = lab.serving()
    assert served["model_version"] == full["model_version"]
    model = AutoModelForCausalLM.from_pretrained(served["model_path"])
    tok = AutoTokenizer.from_pretrained(served["model_path"])
    out = generate(model, tok, prompts, max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert any(o.strip()[:2].rstrip("?").isdigit() for o in out), out

    # LoRA: the merged copy loads on its own; the adapter loads on the job's π_ref snapshot
    # (the weights it was trained on) and gives the same answers as the merged copy
    with lab.engine.connect() as conn:
        snap = get_snapshot(conn, get_checkpoint(conn, lora["id"])["reference_snapshot_id"])
    merged = AutoModelForCausalLM.from_pretrained(lora["artifact_path"])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snap["path"]),
                                        lora["adapter_path"])
    tok = AutoTokenizer.from_pretrained(lora["adapter_path"])
    g_merged = generate(merged, tok, prompts, max_new_tokens=4)
    g_adapted = generate(adapted, tok, prompts, max_new_tokens=4)
    assert g_merged == g_adapted
    ids = tok(prompts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4,
                                   atol=1e-4)
