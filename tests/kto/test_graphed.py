"""CUDA-graph replay of whole training steps (worker.kto.graphed, issue 4): which runs may use
it and how a pack's shape is keyed, on any machine; the replayed trajectory against the eager
one in tests/kto/test_gpu.py (CUDA only)."""

import dataclasses
import logging

import pytest
import torch

from worker.kto import toy
from worker.kto.data import TokenizedExample, make_plan
from worker.kto.graphed import MAX_UNUSED, graph_signature, worth_capturing
from worker.kto.packing import pack_examples
from worker.kto.trainer import KTOTrainConfig, LoraSettings, resolve_cuda_graphs, train_kto


def _fixed(n: int, plen: int, clen: int, offset: int = 0) -> list[TokenizedExample]:
    return [TokenizedExample(list(range(offset + i, offset + i + plen)), list(range(offset + 1, offset + 1 + clen)),
                             i % 2 == 0) for i in range(n)]


def test_signature_keys_shapes_not_values():
    plan = make_plan(8, 4, seed=0, shuffle=False)
    a = pack_examples(_fixed(8, 5, 7), plan.microbatches[0], plan)
    b = pack_examples(_fixed(8, 5, 7, offset=100), plan.microbatches[1], plan)
    assert not torch.equal(a["input_ids"], b["input_ids"])
    assert graph_signature(a) == graph_signature(b)  # same lengths, other tokens: one graph serves both
    longer = _fixed(8, 5, 7)
    longer[plan.microbatches[0][0]] = TokenizedExample(list(range(6)), list(range(7)), True)
    c = pack_examples(longer, plan.microbatches[0], plan)
    assert graph_signature(c) != graph_signature(a)
    # a different longest sequence with the same total length still changes the kernels' launch values
    d = dict(a, max_seqlen=a["max_seqlen"] + 1)
    assert graph_signature(d) != graph_signature(a)
    assert graph_signature(dict(a, n_tokens=0, kl_tokens=0)) == graph_signature(a)


def test_capture_only_shapes_that_pay():
    assert worth_capturing(3, 3, expect_repeats=False, unused=0, min_share=0.5)  # fixed lengths
    assert not worth_capturing(1, 1, expect_repeats=False, unused=0)  # not back yet
    # variable lengths without buckets: a shape back once an epoch is a sliver of the steps
    assert worth_capturing(2, 41, expect_repeats=False, unused=0)  # asked for: True captures it
    assert not worth_capturing(2, 41, expect_repeats=False, unused=0, min_share=0.5)  # "auto" does not
    # a fixed-length run's short last microbatch stays eager under "auto", its full ones are recorded
    assert worth_capturing(30, 32, False, 0, 0.5) and not worth_capturing(2, 32, False, 0, 0.5)
    assert worth_capturing(16, 32, False, 0, 0.5) and not worth_capturing(15, 32, False, 0, 0.5)
    # bucketed packs are recorded at first sight, until too many recorded shapes never came back
    assert worth_capturing(1, 9, expect_repeats=True, unused=MAX_UNUSED - 1, min_share=0.5)
    assert not worth_capturing(1, 9, expect_repeats=True, unused=MAX_UNUSED, min_share=0.5)


def test_cuda_graphs_need_what_they_need(caplog):
    cuda = torch.device("cuda")
    assert resolve_cuda_graphs(KTOTrainConfig(), cuda) is True  # "auto": on where everything holds
    assert resolve_cuda_graphs(KTOTrainConfig(cuda_graphs=False), cuda) is False
    assert resolve_cuda_graphs(KTOTrainConfig(cuda_graphs=True), cuda) is True
    lora = KTOTrainConfig(lora=LoraSettings(r=4))
    assert resolve_cuda_graphs(lora, cuda) is False  # "auto" leaves LoRA eager (not measured with graphs)
    assert resolve_cuda_graphs(dataclasses.replace(lora, cuda_graphs=True), cuda) is True
    with pytest.raises(ValueError, match="cuda_graphs"):
        resolve_cuda_graphs(KTOTrainConfig(cuda_graphs="yes"), cuda)
    with caplog.at_level(logging.WARNING):  # "auto" falls back without a word
        assert resolve_cuda_graphs(KTOTrainConfig(), torch.device("cpu")) is False
        assert resolve_cuda_graphs(KTOTrainConfig(grad_accum_steps=2), cuda) is False
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):
        assert resolve_cuda_graphs(KTOTrainConfig(cuda_graphs=True), torch.device("cpu")) is False
        assert resolve_cuda_graphs(KTOTrainConfig(cuda_graphs=True, grad_accum_steps=2, gradient_checkpointing=True),
                                   cuda, world=2) is False
        assert resolve_cuda_graphs(KTOTrainConfig(cuda_graphs=True, lm_head="checkpoint"), cuda) is False
        softcapped = type("Cfg", (), {"final_logit_softcapping": 30.0})()
        assert resolve_cuda_graphs(KTOTrainConfig(cuda_graphs=True), cuda, model_config=softcapped) is False
    text = caplog.text
    assert "a CUDA device" in text and "packing" in text
    assert "one process" in text and "grad_accum_steps=1" in text and "no gradient_checkpointing" in text
    assert text.count("the fused LM head") == 2


def test_cuda_graphs_request_on_cpu_trains_eagerly(tmp_path):
    tok = toy.make_tokenizer()
    rows = toy.make_feedback(16, desirable_fraction=0.5, seed=2)
    cfg = dict(microbatch_size=4, max_steps=3, learning_rate=1e-3, max_length=32, save_final=False, shuffle=False)
    a = train_kto(KTOTrainConfig(cuda_graphs=True, **cfg), toy.make_model(tok, seed=1), rows, tmp_path / "a",
                  tokenizer=tok, resume=False)
    b = train_kto(KTOTrainConfig(**cfg), toy.make_model(tok, seed=1), rows, tmp_path / "b", tokenizer=tok,
                  resume=False)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.runtime == {"packing": False, "liger_kernels": False, "cuda_graphs": False, "cuda_graph_captures": 0,
                         "cuda_graph_replays": 0}
    assert "step_mode" not in a.history[0]  # only runs with graphs report how each step ran
    assert [h["lr"] for h in a.history] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


def test_checkpoints_keep_a_plain_learning_rate():
    """CUDA graphs keep the learning rate in a device tensor and switch AdamW to capturable; a
    checkpoint is written as a run without graphs would write it, so any later run resumes it."""
    from worker.kto.trainer import _portable_state

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(2.5e-4)
    opt.param_groups[0]["capturable"] = True
    sd = _portable_state(opt, [False])
    assert sd["param_groups"][0]["lr"] == pytest.approx(2.5e-4) and type(sd["param_groups"][0]["lr"]) is float
    assert sd["param_groups"][0]["capturable"] is False
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[0]["capturable"] is True
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_reported_backend_is_the_one_that_ran():
    """Asked for varlen where it cannot run (CPU, float32), the packed forward falls back to the
    per-sequence SDPA loop and says so: CUDA graphs rely on the report to refuse the list-driven
    path, whose boundaries a replay would not update."""
    from worker.kto.packing import last_backends, packed_attention, packed_sequence_logps

    tok = toy.make_tokenizer()
    model = toy.make_model(tok, seed=1)
    data = [TokenizedExample([5, 6, 7], [8, 9], True), TokenizedExample([5, 6], [7, 8, 9], False)]
    plan = make_plan(2, 2, seed=0, shuffle=False)
    with torch.no_grad(), packed_attention(model):
        packed_sequence_logps(model, pack_examples(data, plan.microbatches[0], plan), backend="varlen")
    assert last_backends() == {"forward": "sdpa", "kl_shared": "sdpa"}
