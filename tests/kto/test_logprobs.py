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
