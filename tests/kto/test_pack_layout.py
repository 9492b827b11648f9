"""The packer's layout against a per-token specification (issue 4).

``pack_examples`` builds its packs with array code (the trainer packs the next step on the host
while the device runs the current one); ``_spec_pack`` below is the plain loop over tokens it
replaced, kept as the definition of every field. Random microbatches, lengths, truncation and
both KL layouts must give identical packs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.kto.data import Plan, TokenizedExample
from worker.kto.packing import pack_examples


def _spec_seq(prompt, completion, max_length):
    ids = prompt + completion
    if max_length is not None:
        ids = ids[:max_length]
    return ids, min(len(prompt), len(ids))


def _cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _spec_pack(data, indices, plan, max_length=None, kl=True, share_prompt=True) -> dict:
    L = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    ids, pos, lens, starts, t_pos, t_ids, t_seq = [], [], [], [], [], [], []
    for k, i in enumerate(indices):
        seq, p = _spec_seq(data[i].prompt_ids, data[i].completion_ids, max_length)
        s = len(ids)
        starts.append(s)
        lens.append(len(seq))
        ids.extend(seq)
        pos.extend(range(len(seq)))
        for t in range(max(p, 1), len(seq)):  # token t is a completion token, predicted by row t-1
            t_pos.append(s + t - 1)
            t_ids.append(seq[t])
            t_seq.append(k)
    out = {"n": len(indices), "input_ids": L([ids]), "position_ids": L([pos]),
           "cu_seqlens": torch.tensor(_cu(lens), dtype=torch.int32), "cu_list": _cu(lens),
           "max_seqlen": max(lens, default=0), "target_pos": L(t_pos), "targets": L(t_ids), "target_seq": L(t_seq),
           "n_tokens": len(ids), "share_prompt": share_prompt, "kl": kl}
    if not kl:
        return out
    k_ids, k_pos, q_lens, kv_lens, kv_index, kt_pos, kt_ids, kt_seq = [], [], [], [], [], [], [], []
    first_pos, first_ids, first_seq = [], [], []
    kl_tokens, T = 0, len(ids)
    for k, i in enumerate(indices):
        seq, p = _spec_seq(data[i].prompt_ids, data[plan.partner[i]].completion_ids, max_length)
        kl_tokens += len(seq)
        s = len(k_ids)
        if share_prompt:
            comp = seq[p:]
            if not comp or p == 0:
                continue
            k_ids.extend(comp)
            k_pos.extend(range(p, p + len(comp)))
            q_lens.append(len(comp))
            kv_lens.append(p + len(comp))
            kv_index.extend(range(starts[k], starts[k] + p))
            kv_index.extend(range(T + s, T + s + len(comp)))
            first_pos.append(starts[k] + p - 1)
            first_ids.append(comp[0])
            first_seq.append(k)
            for t in range(1, len(comp)):
                kt_pos.append(s + t - 1)
                kt_ids.append(comp[t])
                kt_seq.append(k)
        else:
            k_ids.extend(seq)
            k_pos.extend(range(len(seq)))
            q_lens.append(len(seq))
            kv_lens.append(len(seq))
            for t in range(max(p, 1), len(seq)):
                kt_pos.append(s + t - 1)
                kt_ids.append(seq[t])
                kt_seq.append(k)
    out.update({"kl_tokens": kl_tokens, "kl_input_ids": L([k_ids]), "kl_position_ids": L([k_pos]),
                "kl_cu_q": torch.tensor(_cu(q_lens), dtype=torch.int32),
                "kl_cu_k": torch.tensor(_cu(kv_lens), dtype=torch.int32),
                "kl_cu_q_list": _cu(q_lens), "kl_cu_k_list": _cu(kv_lens),
                "kl_max_q": max(q_lens, default=0), "kl_max_k": max(kv_lens, default=0),
                "kl_kv_index": L(kv_index) if share_prompt else None,
                "kl_target_pos": L(kt_pos), "kl_targets": L(kt_ids), "kl_target_seq": L(kt_seq),
                "kl_first_pos": L(first_pos), "kl_first_targets": L(first_ids), "kl_first_seq": L(first_seq)})
    return out


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor) and g.dtype == w.dtype, key
            assert g.shape == w.shape and torch.equal(g, w), key
        else:
            assert type(g) is type(w) and g == w, key


def _examples(draw) -> list[TokenizedExample]:
    n = draw(st.integers(2, 7))
    tokens = st.lists(st.integers(0, 999), min_size=0, max_size=12)
    return [TokenizedExample(draw(tokens), draw(tokens.filter(bool)), draw(st.booleans())) for _ in range(n)]


@st.composite
def cases(draw):
    data = _examples(draw)
    n = len(data)
    indices = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    partner = [draw(st.integers(0, n - 1).filter(lambda j, i=i: j != i)) for i in range(n)]
    plan = Plan(microbatches=[indices], partner=partner, seed=0)
    max_length = draw(st.one_of(st.none(), st.integers(1, 20)))
    return data, indices, plan, max_length


@settings(max_examples=300, deadline=None)
@given(case=cases(), kl=st.booleans(), share=st.booleans())
def test_pack_matches_the_per_token_spec(case, kl, share):
    data, indices, plan, max_length = case
    _assert_same(pack_examples(data, indices, plan, max_length, kl=kl, share_prompt=share),
                 _spec_pack(data, indices, plan, max_length, kl=kl, share_prompt=share))


def test_pack_with_empty_prompts_and_all_truncated_kl_pairs():
    """Edge cases the random search may miss: empty prompts (the first token is never a target)
    and KL pairs whose completion is cut away entirely (they drop out of the KL forward)."""
    data = [TokenizedExample([], [5, 6, 7], True), TokenizedExample([1, 2, 3, 4], [8], False),
            TokenizedExample([9], [10, 11], True)]
    plan = Plan(microbatches=[[0, 1, 2]], partner=[1, 2, 0], seed=0)
    for max_length in (None, 1, 2, 4, 5):
        for share in (True, False):
            got = pack_examples(data, [0, 1, 2], plan, max_length, share_prompt=share)
            _assert_same(got, _spec_pack(data, [0, 1, 2], plan, max_length, share_prompt=share))
    got = pack_examples(data, [0, 1, 2], plan, 4, share_prompt=True)
    assert got["kl_cu_q_list"] == [0, 3]  # only example 2's pair ([9] + [5, 6, 7]) keeps completion tokens
