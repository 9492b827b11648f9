import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from worker.kto.data import (
    FeedbackExample,
    collate_microbatch,
    make_plan,
    read_jsonl,
    tokenize_examples,
    truncate,
)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 40), mb=st.integers(1, 12), seed=st.integers(0, 10_000), shuffle=st.booleans())
def test_pairs_never_self_and_microbatches_partition(n, mb, seed, shuffle):
    plan = make_plan(n, mb, seed=seed, shuffle=shuffle)
    assert sorted(i for m in plan.microbatches for i in m) == list(range(n))
    assert all(len(m) <= mb for m in plan.microbatches)
    for i, j in enumerate(plan.partner):
        assert 0 <= j < n and j != i
    # inside a microbatch of >= 2 the partners are a rotation of the same microbatch (TRL's set)
    for m in plan.microbatches:
        if len(m) >= 2:
            assert sorted(plan.partner[i] for i in m) == sorted(m)


def test_plan_seeded_and_epoch_order():
    a, b, c = make_plan(20, 4, seed=1), make_plan(20, 4, seed=1), make_plan(20, 4, seed=2)
    assert a.microbatches == b.microbatches and a.partner == b.partner
    assert a.microbatches != c.microbatches
    orders = [a.epoch_order(e) for e in range(4)]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # shuffled between epochs
    assert a.epoch_order(3) == b.epoch_order(3)


def test_trl_rotation_order():
    plan = make_plan(6, 3, shuffle=False)
    assert plan.microbatches == [[0, 1, 2], [3, 4, 5]]
    assert plan.partner == [2, 0, 1, 5, 3, 4]  # TRL: [c[-1]] + c[:-1]


def test_single_example_microbatches_pair_across_dataset():
    plan = make_plan(5, 1, seed=3)
    assert all(len(m) == 1 for m in plan.microbatches)
    assert all(j != i for i, j in enumerate(plan.partner))
    with pytest.raises(ValueError):
        make_plan(1, 1)


def test_truncate_keeps_prompt_end_and_completion_start():
    p, c = list(range(10)), list(range(100, 110))
    p2, c2, t = truncate(p, c, max_length=8, max_prompt_length=3)
    assert t and p2 == [7, 8, 9] and c2 == [100, 101, 102, 103, 104]
    p3, c3, t3 = truncate(p[:2], c[:2], 8, 3)
    assert not t3 and p3 == [0, 1] and c3 == [100, 101]


def test_tokenize_counts_truncated_and_dropped(tok):
    exs = [
        FeedbackExample("1+2=", "3", True),  # fits
        FeedbackExample("a long long prompt 1+2=", "3", False),  # prompt truncated
        FeedbackExample("1+2=", "a very long completion", True),  # completion truncated
        FeedbackExample("x", "y", False),
    ]
    data, stats = tokenize_examples(exs, tok, max_length=12, max_prompt_length=6)
    assert stats.n_input == 4 and stats.n_truncated == 2 and stats.n_dropped == 0 and stats.n_kept == 4
    assert tok.decode(data[1].prompt_ids) == "t 1+2="  # the END of the prompt
    assert tok.decode(data[2].completion_ids) == "a very l"  # the START of the completion
    assert all(len(d.prompt_ids) + len(d.completion_ids) <= 12 for d in data)
    assert stats.n_desirable == 2 and stats.n_undesirable == 2
    # an empty prompt cannot be scored: dropped and counted
    data, stats = tokenize_examples([FeedbackExample("", "3", True), exs[0]], tok, max_length=12)
    assert stats.n_dropped == 1 and stats.n_kept == 1


def test_text_and_chat_tokenisation(tok):
    data, _ = tokenize_examples([
        FeedbackExample("3+4=", "7", True),
        FeedbackExample([{"role": "user", "content": "3+4="}], "7", False),
    ], tok)
    assert tok.decode(data[0].prompt_ids) == "3+4="
    assert tok.decode(data[0].completion_ids) == "7<|im_end|>"  # EOS appended to text completions
    assert tok.decode(data[1].prompt_ids) == "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(data[1].completion_ids).startswith("7<|im_end|>")


def test_read_jsonl(tmp_path):
    f = tmp_path / "e.jsonl"
    rows = [
        {"prompt": "1+1=", "completion": "2", "label": True},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": "yo", "desirable": False},
        {"prompt": "1+1=", "completion": "3", "label": "false"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ex = read_jsonl(f)
    assert [e.desirable for e in ex] == [True, False, False]
    assert isinstance(ex[1].prompt, list)
    f.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(ValueError, match=":1:"):
        read_jsonl(f)


def test_collate_kl_sequences_use_partner_completion(tok):
    exs = [FeedbackExample(f"{i}+1=", str(i + 1), i % 2 == 0) for i in range(5)]
    data, _ = tokenize_examples(exs, tok)
    plan = make_plan(len(data), 3, seed=0)
    mb = plan.microbatches[0]
    b = collate_microbatch(data, mb, plan, tok.pad_token_id)
    for row, i in enumerate(mb):
        ids = b["kl_input_ids"][row][b["kl_attention_mask"][row].bool()].tolist()
        comp = b["kl_input_ids"][row][b["kl_completion_mask"][row].bool()].tolist()
        assert ids[: len(data[i].prompt_ids)] == data[i].prompt_ids
        assert comp == data[plan.partner[i]].completion_ids != data[i].completion_ids
        assert b["input_ids"][row][b["completion_mask"][row].bool()].tolist() == data[i].completion_ids
    assert b["desirable"].tolist() == [data[i].desirable for i in mb]
