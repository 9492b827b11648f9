import torch

from worker.kto.data import FeedbackExample, collate_microbatch, make_plan, tokenize_examples
from worker.kto.logprobs import naive_sequence_logps, sequence_logps
from worker.kto import toy


def _batch(tok):
    exs = [FeedbackExample("12+3=", "15", True), FeedbackExample("a+b?", "no idea at all", False),
           FeedbackExample([{"role": "user", "content": "9+9="}], "18", True)]
    data, _ = tokenize_examples(exs, tok)
    plan = make_plan(len(data), 3, shuffle=False)
    return collate_microbatch(data, [0, 1, 2], plan, tok.pad_token_id)


def test_chunked_equals_naive_values_and_grads(tok):
    model = toy.make_model(tok, seed=1)
    b = _batch(tok)
    args = (b["input_ids"], b["attention_mask"], b["completion_mask"])
    naive = naive_sequence_logps(model, *args)
    naive.sum().backward()
    g_naive = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for chunk in (1, 3, 1024):
        chunked = sequence_logps(model, *args, chunk_size=chunk)
        assert chunked.dtype == torch.float32
        torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-5)
        chunked.sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, g_naive[n], rtol=1e-4, atol=1e-6)
        model.zero_grad()
    # padding does not change a sequence's value: score the shortest row alone
    alone = sequence_logps(model, *(a[:1, : int(b["attention_mask"][0].sum())] for a in args))
    torch.testing.assert_close(alone[0], naive[0], rtol=1e-5, atol=1e-5)


def test_only_completion_tokens_count(tok):
    model = toy.make_model(tok, seed=1)
    b = _batch(tok)
    zero = torch.zeros_like(b["completion_mask"])
    assert torch.all(sequence_logps(model, b["input_ids"], b["attention_mask"], zero) == 0)


def test_architectures_that_scale_their_logits_are_scored_as_their_own_forward():
    """Some causal LMs scale the LM head's output in their forward: HyperCLOVA X multiplies by
    ``logits_scaling`` (Granite divides by it), Falcon-H1 multiplies by ``lm_head_multiplier``.
    log p(y|x) must be the model's own softmax, so the chunked head applies the same factor."""
    import pytest
    from transformers import AutoConfig, AutoModelForCausalLM

    cases = [("hyperclovax", {"logits_scaling": 0.25}), ("granite", {"logits_scaling": 4.0}),
             ("falcon_h1", {"lm_head_multiplier": 0.3, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16,
                            "mamba_d_state": 16, "mamba_n_groups": 1})]
    for model_type, extra in cases:
        try:
            cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       eos_token_id=0, bos_token_id=1, pad_token_id=2, **extra)
        except (KeyError, ValueError):
            pytest.skip(f"this transformers has no {model_type}")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8)  # logits large enough for the factor to show
        ids = torch.randint(3, 64, (2, 10))
        mask = torch.ones_like(ids)
        comp = torch.zeros_like(ids)
        comp[:, 5:] = 1
        with torch.no_grad():
            torch.testing.assert_close(sequence_logps(model, ids, mask, comp), naive_sequence_logps(model, ids, mask, comp),
                                       rtol=1e-4, atol=1e-4, msg=model_type)


def test_training_refuses_a_model_whose_logits_it_would_score_wrongly(monkeypatch):
    """A logit transform the LM head does not know (here: Granite's, forgotten) stops the run
    before its first step with an error naming the architecture; the known one passes."""
    import pytest
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker.kto import logprobs
    from worker.kto.logprobs import check_scoring

    cfg = AutoConfig.for_model("granite", vocab_size=64, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               eos_token_id=0, bos_token_id=1, pad_token_id=2, logits_scaling=4.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)  # logits as large as a trained model's
    ids = torch.randint(3, 64, (20,))
    assert check_scoring(model, ids) < 1e-4 and model.training  # its mode is left as it was
    monkeypatch.setattr(logprobs, "_logit_transform", lambda config: (1.0, None))
    with pytest.raises(ValueError, match=r"granite.*does not reproduce"):
        check_scoring(model, ids)
