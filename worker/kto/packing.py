"""Padding-free ("packed") KTO microbatches.

Why: with chat-like lengths (prompt and completion uniform in [64, 512]) a right-padded batch
spends about half of its FLOPs on pad tokens. Packing concatenates a microbatch's sequences into
one row (batch size 1) with ``position_ids`` restarting at every sequence, and runs attention
that keeps the sequences apart, so every FLOP goes to a real token. Per-example log-probs are
the padded path's (tests hold them to 1e-5 in float32).

A KTO microbatch needs two forwards:

* the policy forward over (x_i, y_i), with gradients;
* the KL forward over the mismatched pairs (x_i, y_j), without gradients. x_i is the prompt the
  policy forward has just encoded, so with ``share_prompt=True`` the KL forward runs only the
  partner completions y_j: their queries attend to the prompt's keys/values captured from the
  policy forward (same weights, tokens and positions: the same numbers) followed by their own,
  and y_j's first token is scored from the policy forward's hidden state at the prompt's last
  token. That removes the prompt half of the KL forward.

Attention backends (``backend``), all exact, all causal with the queries aligned to the END of
their keys (a KL segment's queries are the last ones of prompt + completion):

* ``varlen``: :func:`torch.nn.attention.varlen.varlen_attn` (the FlashAttention-2 kernels that
  ship inside torch; CUDA with bf16/fp16 only);
* ``flex``: FlexAttention with a document mask (block-sparse; compiled on CUDA);
* ``sdpa``: one ``scaled_dot_product_attention`` call per sequence (any device and dtype);
* ``auto``: varlen on CUDA with a half dtype when it passes a one-off self-check, else flex on
  CUDA, else sdpa.

How it plugs into transformers: the attention function is registered in transformers'
``AttentionInterface`` (and ``AttentionMaskInterface``) as :data:`ATTN_NAME`;
:func:`packed_attention` switches a model to it for the duration of training. It receives the
packing metadata as a forward kwarg (transformers passes extra kwargs through to the attention
function); without that kwarg it is plain SDPA, so padded calls (evaluation, generation) are
unchanged. No ``[T, T]`` mask is ever built.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Plan, TokenizedExample
from .logprobs import _unwrap, token_logps_from_hidden

log = logging.getLogger(__name__)

ATTN_NAME = "prospect_packed"
BACKENDS = ("auto", "varlen", "flex", "sdpa")

# Set while a packed forward runs: the registered mask function then builds no mask at all.
_PACKED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("prospect_packed_forward", default=False)


# --------------------------------------------------------------------------- packing (host side)

def _seq(prompt: list[int], completion: list[int], max_length: int | None) -> tuple[list[int], int]:
    """(ids, prompt_len) as :func:`worker.kto.data.collate_sequences` truncates them."""
    ids = prompt + completion
    if max_length is not None:
        ids = ids[:max_length]
    return ids, min(len(prompt), len(ids))


def _cu(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _segments(lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first row of each segment, segment of each row, each row's offset in its segment) for
    segments of ``lens`` rows laid end to end."""
    starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    seg = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    return starts, seg, np.arange(len(seg), dtype=np.int64) - starts[seg]


def _flat(seqs: Sequence[list[int]]) -> np.ndarray:
    out: list[int] = []
    for s in seqs:
        out.extend(s)
    return np.array(out, dtype=np.int64)


def _t(a: np.ndarray, dtype=torch.long) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def pack_examples(
    data: Sequence[TokenizedExample],
    indices: Sequence[int],
    plan: Plan | None,
    max_length: int | None = None,
    kl: bool = True,
    share_prompt: bool = True,
) -> dict[str, Any]:
    """Pack ``indices`` (and, with ``kl``, their fixed KL pairs from ``plan``) into one row.

    Returns CPU tensors and Python ints (see :func:`pack_to`): ``input_ids``/``position_ids``
    ``[1, T]``, ``cu_seqlens`` ``[n+1]``, the rows whose hidden state predicts a completion token
    (``target_pos``), those tokens (``targets``) and their example (``target_seq``); the same with
    a ``kl_`` prefix for the KL forward. ``n_tokens``/``kl_tokens`` count real tokens as the padded
    path's attention masks do (full KL sequences, whether or not the prompt is shared).

    Array code, not a loop over tokens: the trainer packs the next step while the device runs the
    current one, and a per-token Python loop (about 10 ms for 32 chat-length pairs) can outlast
    the device's remaining work on a small model.
    """
    n = len(indices)
    seqs, plens = [], []
    for i in indices:
        seq, p = _seq(data[i].prompt_ids, data[i].completion_ids, max_length)
        seqs.append(seq)
        plens.append(p)
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    ids = _flat(seqs)
    starts, seg, local = _segments(lens)
    # token t of a sequence is a completion token (t >= prompt length, never the first), predicted by row t-1
    rows = np.flatnonzero(local >= np.maximum(np.array(plens, dtype=np.int64), 1)[seg])
    cu = _cu(lens.tolist())
    T = len(ids)
    out: dict[str, Any] = {
        "n": n,
        "input_ids": _t(ids).unsqueeze(0),
        "position_ids": _t(local).unsqueeze(0),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "cu_list": cu,
        "max_seqlen": int(lens.max(initial=0)),
        "target_pos": _t(rows - 1),
        "targets": _t(ids[rows]),
        "target_seq": _t(seg[rows]),
        "n_tokens": T,
        "share_prompt": bool(share_prompt),
        "kl": bool(kl),
    }
    if not kl:
        return out
    if plan is None:
        raise ValueError("KL pairs need the plan")
    kl_seqs, kl_plens, slots = [], [], []
    kl_tokens = 0
    for k, i in enumerate(indices):
        seq, p = _seq(data[i].prompt_ids, data[plan.partner[i]].completion_ids, max_length)
        kl_tokens += len(seq)
        if share_prompt:
            if p == 0 or p == len(seq):
                continue  # no KL completion token survives truncation: log-prob 0, as padded
            seq = seq[p:]  # only the completion runs; the prompt's keys/values come from the policy forward
        kl_seqs.append(seq)
        kl_plens.append(p)
        slots.append(k)
    q_lens = np.array([len(s) for s in kl_seqs], dtype=np.int64)
    k_ids = _flat(kl_seqs)
    kp = np.array(kl_plens, dtype=np.int64)
    slot = np.array(slots, dtype=np.int64)
    q_starts, q_seg, q_local = _segments(q_lens)
    if share_prompt:
        # a KL segment's queries sit after its prompt: positions p.., keys = the policy forward's
        # prompt rows, then the segment's own rows (at T + ...: after the policy rows in cat(prefix, own))
        kv_lens = kp + q_lens
        _, kv_seg, kv_local = _segments(kv_lens)
        in_prompt = kv_local < kp[kv_seg]
        kv_index = np.where(in_prompt, starts[slot][kv_seg] + kv_local, T + q_starts[kv_seg] + kv_local - kp[kv_seg])
        k_pos = kp[q_seg] + q_local
        k_rows = np.flatnonzero(q_local >= 1)  # the first completion token is scored from the policy forward
        first_pos, first_ids, first_seq = starts[slot] + kp - 1, k_ids[q_starts], slot
    else:
        kv_lens, kv_index = q_lens, None
        k_pos = q_local
        k_rows = np.flatnonzero(q_local >= np.maximum(kp, 1)[q_seg])
        first_pos = first_ids = first_seq = np.zeros(0, dtype=np.int64)
    cu_q = _cu(q_lens.tolist())
    cu_k = _cu(kv_lens.tolist())
    out.update({
        "kl_tokens": kl_tokens,
        "kl_input_ids": _t(k_ids).unsqueeze(0),
        "kl_position_ids": _t(k_pos).unsqueeze(0),
        "kl_cu_q": torch.tensor(cu_q, dtype=torch.int32),
        "kl_cu_k": torch.tensor(cu_k, dtype=torch.int32),
        "kl_cu_q_list": cu_q,
        "kl_cu_k_list": cu_k,
        "kl_max_q": int(q_lens.max(initial=0)),
        "kl_max_k": int(kv_lens.max(initial=0)),
        "kl_kv_index": _t(kv_index) if kv_index is not None else None,
        "kl_target_pos": _t(k_rows - 1),
        "kl_targets": _t(k_ids[k_rows]),
        "kl_target_seq": _t(slot[q_seg[k_rows]]),
        "kl_first_pos": _t(first_pos),
        "kl_first_targets": _t(first_ids),
        "kl_first_seq": _t(first_seq),
    })
    return out


def bucket_pack(pack: dict[str, Any], bucket: int, max_length: int | None = None) -> dict[str, Any]:
    """``pack`` padded so that its shapes take few values: every token and target count is
    rounded up to a multiple of ``bucket``, and the longest-sequence bounds are fixed (to
    ``max_length`` where given, else rounded up to the bucket). A CUDA graph replays only the
    shapes it recorded (worker.kto.graphed); chat-length packs differ in length at every step,
    padded ones fall into a handful of shapes.

    What is added changes no real sequence's numbers: a dummy sequence closes each forward
    (its own document for the attention kernels, at position 0; in the shared-prompt KL forward
    its extra keys point at row 0 and only it sees them), KL pairs that truncation dropped come
    back as empty segments (so the segment count stays n), and the extra target rows score
    row 0 into an extra example slot ``n`` that ``packed_sequence_logps`` drops (``n_slots``),
    so no gradient reaches them. Costs up to ``bucket - 1`` tokens per forward and per target
    list."""
    if bucket <= 0:
        return pack
    n = pack["n"]
    out = dict(pack)
    up = lambda x: -(-x // bucket) * bucket  # noqa: E731

    def bound(real: int, floor: int = 0) -> int:
        """A longest-sequence bound that does not move from pack to pack (>= every segment)."""
        return max(max_length, bucket, floor) if max_length else max(up(real), bucket, floor)

    def zeros(k: int) -> torch.Tensor:
        return torch.zeros(k, dtype=torch.long)

    def targets(prefix: str) -> None:
        pos, tok, seq = (pack[f"{prefix}{k}"] for k in ("target_pos", "targets", "target_seq"))
        e = (-len(tok)) % bucket
        out[f"{prefix}target_pos"] = torch.cat([pos, zeros(e)])
        out[f"{prefix}targets"] = torch.cat([tok, zeros(e)])
        out[f"{prefix}target_seq"] = torch.cat([seq, torch.full((e,), n, dtype=torch.long)])

    T = pack["input_ids"].shape[1]
    d = (-T) % bucket
    out["input_ids"] = torch.cat([pack["input_ids"], zeros(d)[None]], 1)
    out["position_ids"] = torch.cat([pack["position_ids"], zeros(d)[None]], 1)
    out["cu_list"] = [*pack["cu_list"], T + d]
    out["cu_seqlens"] = torch.tensor(out["cu_list"], dtype=torch.int32)
    out["max_seqlen"] = bound(pack["max_seqlen"])
    targets("")
    out["n_slots"] = n + 1
    if not pack["kl"]:
        return out
    Tk = pack["kl_input_ids"].shape[1]
    dk = (-Tk) % bucket
    out["kl_input_ids"] = torch.cat([pack["kl_input_ids"], zeros(dk)[None]], 1)
    out["kl_position_ids"] = torch.cat([pack["kl_position_ids"], zeros(dk)[None]], 1)
    dropped = n + 1 - len(pack["kl_cu_q_list"])  # pairs truncation left without a completion token
    cu_q = [*pack["kl_cu_q_list"], *[Tk] * dropped]
    cu_k = [*pack["kl_cu_k_list"], *[pack["kl_cu_k_list"][-1]] * dropped]
    out["kl_cu_q_list"] = [*cu_q, Tk + dk]
    if pack.get("kl_kv_index") is not None:
        kv = pack["kl_kv_index"].clone()
        kv[kv >= T] += d  # its own rows come after the (now longer) policy rows in cat(prefix, own)
        e = (-(len(kv) + dk)) % bucket
        out["kl_kv_index"] = torch.cat([kv, zeros(e), T + d + Tk + torch.arange(dk)])
        out["kl_cu_k_list"] = [*cu_k, len(kv) + e + dk]
        out["kl_max_k"] = bound(pack["kl_max_k"], 2 * bucket)
        f = len(pack["kl_first_pos"])  # one row per kept pair
        out["kl_first_pos"] = torch.cat([pack["kl_first_pos"], zeros(n - f)])
        out["kl_first_targets"] = torch.cat([pack["kl_first_targets"], zeros(n - f)])
        out["kl_first_seq"] = torch.cat([pack["kl_first_seq"], torch.full((n - f,), n, dtype=torch.long)])
    else:
        out["kl_cu_k_list"] = [*cu_k, cu_k[-1] + dk]
        out["kl_max_k"] = bound(pack["kl_max_k"])
    out["kl_cu_q"] = torch.tensor(out["kl_cu_q_list"], dtype=torch.int32)
    out["kl_cu_k"] = torch.tensor(out["kl_cu_k_list"], dtype=torch.int32)
    out["kl_max_q"] = bound(pack["kl_max_q"])
    targets("kl_")
    return out


def pack_to(pack: dict[str, Any], device) -> dict[str, Any]:
    """Move the tensors of a pack (or a padded batch) to ``device``; Python values stay. To CUDA
    through pinned memory, so the copies are queued behind the running kernels instead of
    making the host wait for them."""
    if torch.device(device).type != "cuda":
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in pack.items()}
    return {k: (v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in pack.items()}


# --------------------------------------------------------------------------- attention backends

@dataclass
class PackContext:
    """What one packed forward's attention calls need; passed as the ``prospect_pack`` kwarg."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    cu_q_list: list[int]
    cu_k_list: list[int]
    max_q: int
    max_k: int
    backend: str = "auto"
    # doc id / position of every query and key row (flex only; built lazily)
    pos_q: torch.Tensor | None = None
    pos_k: torch.Tensor | None = None
    kv_index: torch.Tensor | None = None  # KL forward: rows of cat(prefix kv, own kv)
    prefix: dict[Any, tuple[torch.Tensor, torch.Tensor]] | None = None  # attention module -> (k, v)
    capture: dict[Any, tuple[torch.Tensor, torch.Tensor]] | None = None
    resolved: str | None = None
    _block_mask: Any = None
    _docs: tuple[torch.Tensor, torch.Tensor] | None = None

    def docs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._docs is None:
            dev = self.cu_q.device
            lq = torch.tensor([b - a for a, b in zip(self.cu_q_list, self.cu_q_list[1:])], device=dev)
            lk = torch.tensor([b - a for a, b in zip(self.cu_k_list, self.cu_k_list[1:])], device=dev)
            seg = torch.arange(len(lq), device=dev)
            self._docs = (torch.repeat_interleave(seg, lq), torch.repeat_interleave(seg, lk))
        return self._docs


def _segment_positions(cu_list: list[int], offsets: list[int], device) -> torch.Tensor:
    parts = [torch.arange(o, o + (b - a), device=device) for a, b, o in zip(cu_list, cu_list[1:], offsets)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def _causal_br(lq: int, lk: int, device) -> torch.Tensor:
    """Causal mask with the queries aligned to the end of the keys (bottom-right)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


def attention_sdpa_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: PackContext, scale: float) -> torch.Tensor:
    """One SDPA call per sequence: exact on any device and dtype (the CPU path)."""
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s in range(len(ctx.cu_q_list) - 1):
        a, b = ctx.cu_q_list[s], ctx.cu_q_list[s + 1]
        c, d = ctx.cu_k_list[s], ctx.cu_k_list[s + 1]
        if b == a:
            continue
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q[a:b], k[c:d], v[c:d]))
        if b - a == d - c:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=_causal_br(b - a, d - c, q.device), scale=scale,
                                               enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


_VARLEN: dict[str, Any] = {}


def _varlen_fn() -> Callable | None:
    if "fn" not in _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        _VARLEN["fn"] = varlen_attn
        params = inspect.signature(varlen_attn).parameters if varlen_attn is not None else {}
        _VARLEN["kw"] = ({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
        if "enable_gqa" in params:
            _VARLEN["kw"]["enable_gqa"] = True
    return _VARLEN["fn"]


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: PackContext, scale: float,
                     repeat_kv: bool = False) -> torch.Tensor:
    """FlashAttention-2 varlen kernels from torch (bottom-right causal when q and k lengths differ)."""
    fn = _varlen_fn()
    if repeat_kv and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q.contiguous(), k.contiguous(), v.contiguous(), ctx.cu_q, ctx.cu_k, ctx.max_q, ctx.max_k,
              scale=scale, **_VARLEN["kw"])


_FLEX: dict[str, Any] = {}


def _flex_fn(device: torch.device) -> Callable:
    key = device.type
    if key not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        # Eager flex materialises the scores (fine for CPU tests); on CUDA it must be compiled.
        _FLEX[key] = torch.compile(flex_attention, dynamic=True) if device.type == "cuda" else flex_attention
    return _FLEX[key]


def attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: PackContext, scale: float) -> torch.Tensor:
    """FlexAttention with a document mask (only blocks that overlap a sequence are computed)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if ctx._block_mask is None:
        doc_q, doc_k = ctx.docs()
        pos_q, pos_k = ctx.pos_q, ctx.pos_k

        def mask_mod(b, h, qi, ki):
            return (doc_q[qi] == doc_k[ki]) & (pos_k[ki] <= pos_q[qi])

        ctx._block_mask = create_block_mask(mask_mod, None, None, q.shape[0], k.shape[0], device=q.device)
    out = _flex_fn(q.device)(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                             v.transpose(0, 1).unsqueeze(0), block_mask=ctx._block_mask, scale=scale,
                             enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


_SELF_CHECK: dict[tuple, str | None] = {}
_LAST_BACKEND: dict[str, str] = {}


def last_backends() -> dict[str, str]:
    """The backends the latest packed forwards ran ("forward"; "kl_shared" for the shared-prompt
    KL forward): what ``auto`` resolved to, for reports."""
    return dict(_LAST_BACKEND)


def _self_check(device: torch.device, dtype: torch.dtype, bottom_right: bool = False) -> str | None:
    """Which fast CUDA backend gives the sdpa-loop's values (forward and gradients) on a small
    GQA problem: "varlen", "varlen_repeat", "flex" or None. ``bottom_right`` adds a segment whose
    queries are the last ones of its keys (the shared-prompt KL forward), checked apart so that a
    kernel that gets only that case wrong still serves the policy forward. Run once per device,
    dtype and case, because the kernels' behaviour differs across torch builds."""
    key = (str(device), dtype, bottom_right)
    if key not in _SELF_CHECK:
        # full precision reference, and gradients even when called under no_grad (reference scoring)
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            _SELF_CHECK[key] = _run_self_check(device, dtype, bottom_right)
    return _SELF_CHECK[key]


def _run_self_check(device: torch.device, dtype: torch.dtype, bottom_right: bool = False) -> str | None:
    g = torch.Generator(device="cpu").manual_seed(0)
    H, Hk, D = 4, 2, 64
    # bottom_right: the last segment has 9 queries at the end of 30 keys
    lq, lk = ([17, 40, 9], [17, 40, 30]) if bottom_right else ([17, 40, 30], [17, 40, 30])
    cq, ck = _cu(lq), _cu(lk)
    mk = lambda n, h: torch.randn(n, h, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    q, k, v = mk(cq[-1], H), mk(ck[-1], Hk), mk(ck[-1], Hk)
    ctx = PackContext(torch.tensor(cq, dtype=torch.int32, device=device), torch.tensor(ck, dtype=torch.int32, device=device),
                      cq, ck, max(lq), max(lk))
    ctx.pos_q = _segment_positions(cq, [b - a for a, b in zip(lq, lk)], device)
    ctx.pos_k = _segment_positions(ck, [0] * len(lk), device)
    ref = attention_sdpa_loop(q.float(), k.float(), v.float(), ctx, D ** -0.5)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((a.float() - b.float()).norm() <= tol * b.float().norm() + 1e-6)

    candidates: list[tuple[str, Callable]] = []
    if _varlen_fn() is not None and dtype in (torch.bfloat16, torch.float16):
        candidates += [("varlen", lambda: attention_varlen(q, k, v, ctx, D ** -0.5)),
                       ("varlen_repeat", lambda: attention_varlen(q, k, v, ctx, D ** -0.5, repeat_kv=True))]
    candidates.append(("flex", lambda: attention_flex(q, k, v, ctx, D ** -0.5)))
    chosen = None
    for name, fn in candidates:
        try:
            out = fn()
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            ok = close(out, ref) and all(close(a, b) for a, b in zip(grads, grads_ref))
            log.info("packed attention self-check %s on %s/%s: %s", name, device, dtype, "ok" if ok else "MISMATCH")
            if ok:
                chosen = name
                break
        except Exception as e:  # a backend this torch build lacks: try the next one
            log.info("packed attention self-check %s failed: %r", name, e)
        ctx._block_mask = None
    return chosen


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, bottom_right: bool = False) -> str:
    """The backend actually run for ``backend`` on this device and compute dtype (``bottom_right``:
    for a forward whose queries end their keys, the shared-prompt KL forward)."""
    if backend not in BACKENDS + ("varlen_repeat",):
        raise ValueError(f"unknown attention backend {backend!r}; one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return _self_check(device, dtype, bottom_right) or "sdpa"
    return "sdpa"


def _attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float = 0.0,
               scaling: float | None = None, **kwargs):
    """transformers attention function: packed when a ``prospect_pack`` kwarg comes, else SDPA."""
    ctx: PackContext | None = kwargs.pop("prospect_pack", None)
    if ctx is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("a packed forward has batch size 1")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("packed attention does not implement logit softcapping")
    if dropout:
        raise NotImplementedError("packed attention does not implement attention dropout; train with "
                                  "disable_dropout=True (the default) or packing=False")
    window = kwargs.get("sliding_window")
    if window is not None and window < ctx.max_k:
        raise NotImplementedError("packed attention does not implement sliding windows shorter than a sequence")
    # squeeze, not [0]: its backward is a view, where select's writes a zero-filled copy of each of
    # q, k and v per layer (six kernels a layer for nothing)
    q = query.squeeze(0).transpose(0, 1)  # [T, H, D]
    k = key.squeeze(0).transpose(0, 1)
    v = value.squeeze(0).transpose(0, 1)
    dev = q.device.type
    if torch.is_autocast_enabled(dev) and q.dtype != torch.get_autocast_dtype(dev):
        # float32 weights under bf16 autocast: RoPE's float32 cos/sin promote q and k to float32.
        # SDPA would be cast by autocast; these kernels are not, so cast as it would.
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    layer = module  # the same attention module runs the policy and the KL forward of a layer
    if ctx.capture is not None:
        ctx.capture[layer] = (k.detach(), v.detach())
    if ctx.prefix is not None:
        pk, pv = ctx.prefix[layer]
        k = torch.cat([pk, k]).index_select(0, ctx.kv_index)
        v = torch.cat([pv, v]).index_select(0, ctx.kv_index)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if ctx.resolved is None:
        ctx.resolved = resolve_backend(ctx.backend, q.device, q.dtype, bottom_right=ctx.prefix is not None)
        _LAST_BACKEND["kl_shared" if ctx.prefix is not None else "forward"] = ctx.resolved
    if ctx.resolved in ("varlen", "varlen_repeat"):
        if q.dtype not in (torch.float16, torch.bfloat16) or q.device.type != "cuda":
            out = attention_sdpa_loop(q, k, v, ctx, scale)  # FlashAttention has no float32 / CPU kernel
            _LAST_BACKEND["kl_shared" if ctx.prefix is not None else "forward"] = "sdpa"  # what ran
        else:
            out = attention_varlen(q, k, v, ctx, scale, repeat_kv=ctx.resolved == "varlen_repeat")
    elif ctx.resolved == "flex":
        out = attention_flex(q, k, v, ctx, scale)
    else:
        out = attention_sdpa_loop(q, k, v, ctx, scale)
    return out.unsqueeze(0), None


def _mask(*args, **kwargs):
    """Mask function registered with the attention: none for packed forwards (the attention keeps
    the sequences apart by itself), SDPA's otherwise."""
    if _PACKED_FORWARD.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


_REGISTERED = False


def register() -> None:
    """Register :data:`ATTN_NAME` with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, _mask)
    _REGISTERED = True


@contextlib.contextmanager
def packed_attention(*models) -> Iterator[None]:
    """Switch ``models`` (any wrapper: peft, DDP) to the packed attention function, and back."""
    register()
    saved = []
    for m in models:
        if m is None:
            continue
        cfg = _unwrap(m).config
        saved.append((cfg, cfg._attn_implementation))
        cfg._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        for cfg, name in saved:
            cfg._attn_implementation = name


def _backbone_and_head(model):
    inner = _unwrap(model)
    backbone = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.model
    return inner, backbone, inner.get_output_embeddings()


def _run_backbone(backbone, input_ids, position_ids, ctx: PackContext) -> torch.Tensor:
    token = _PACKED_FORWARD.set(True)
    try:
        # An all-true 2D mask rather than None: with None, transformers looks for packed sequences
        # in position_ids, which costs a device sync per forward; the registered mask function
        # returns no mask for packed forwards either way.
        mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        out = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False,
                       prospect_pack=ctx)
    finally:
        _PACKED_FORWARD.reset(token)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden.squeeze(0)


def _check_switched(inner) -> None:
    if inner.config._attn_implementation != ATTN_NAME:
        raise RuntimeError("packed forwards need the model switched with worker.kto.packing.packed_attention(model)")


def packed_sequence_logps(
    model, pack: dict[str, Any], chunk_size: int = 1024, backend: str = "auto", with_kl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(y_i|x_i) [n], log p(y_partner(i)|x_i) [n] or None) float32, from a pack on the model's
    device. The first carries gradients when grad mode is on; the KL one never does."""
    inner, backbone, lm_head = _backbone_and_head(model)
    _check_switched(inner)
    n = pack["n"]
    with_kl = pack["kl"] if with_kl is None else with_kl
    share = with_kl and pack.get("share_prompt", False)
    ctx = PackContext(pack["cu_seqlens"], pack["cu_seqlens"], pack["cu_list"], pack["cu_list"], pack["max_seqlen"],
                      pack["max_seqlen"], backend=backend, capture={} if share else None)
    if backend in ("flex", "auto"):
        ctx.pos_q = ctx.pos_k = pack["position_ids"][0]
    hidden = _run_backbone(backbone, pack["input_ids"], pack["position_ids"], ctx)
    tok = token_logps_from_hidden(hidden.index_select(0, pack["target_pos"]), pack["targets"], lm_head, inner.config,
                                  chunk_size)
    slots = pack.get("n_slots", n)  # a bucketed pack scores its padding into slot n, dropped here
    logps = torch.zeros(slots, dtype=torch.float32, device=tok.device).index_add(0, pack["target_seq"], tok)[:n]
    if not with_kl:
        return logps, None
    kl = torch.zeros(slots, dtype=torch.float32, device=tok.device)
    with torch.no_grad():
        rows, targets, seqs = [], [], []
        if pack["kl_input_ids"].shape[1] > 0:
            kctx = PackContext(pack["kl_cu_q"], pack["kl_cu_k"], pack["kl_cu_q_list"], pack["kl_cu_k_list"],
                               pack["kl_max_q"], pack["kl_max_k"], backend=backend,
                               resolved=None if share else ctx.resolved)
            if share:
                kctx.prefix, kctx.kv_index = ctx.capture, pack["kl_kv_index"]
            if backend in ("flex", "auto"):
                kctx.pos_q = pack["kl_position_ids"][0]
                kctx.pos_k = (torch.cat([pack["position_ids"][0], pack["kl_position_ids"][0]]).index_select(0, pack["kl_kv_index"])
                              if share else kctx.pos_q)
            khidden = _run_backbone(backbone, pack["kl_input_ids"], pack["kl_position_ids"], kctx)
            rows.append(khidden.index_select(0, pack["kl_target_pos"]))
            targets.append(pack["kl_targets"])
            seqs.append(pack["kl_target_seq"])
        if share and pack["kl_first_pos"].numel():
            rows.append(hidden.detach().index_select(0, pack["kl_first_pos"]))
            targets.append(pack["kl_first_targets"])
            seqs.append(pack["kl_first_seq"])
        if rows:
            ktok = token_logps_from_hidden(torch.cat(rows), torch.cat(targets), lm_head, inner.config, chunk_size)
            kl.index_add_(0, torch.cat(seqs), ktok)
    if ctx.capture is not None:
        ctx.capture.clear()  # a gradient-checkpointing recompute must not refill it
        ctx.capture = None
    return logps, kl[:n]


# --------------------------------------------------------------------------- optional kernels

def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def apply_liger(model) -> bool:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on ``model`` (never its loss kernels: the log-probs
    come from our own chunked LM head). True when applied. CUDA only."""
    if not torch.cuda.is_available() or not liger_available():
        return False
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    inner = _unwrap(model)
    _apply_liger_kernel_to_instance(model=inner, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True


def compile_layers(model, dynamic: bool = True) -> int:
    """``torch.compile`` each decoder layer (regional compilation: one compiled graph reused by
    all layers); the packed attention call stays eager. Returns the number of layers compiled."""
    _, backbone, _ = _backbone_and_head(model)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        return 0
    register()
    from transformers import AttentionInterface

    # the packed attention (Python bookkeeping around the kernel) stays out of the graphs
    AttentionInterface.register(ATTN_NAME, torch.compiler.disable(_attention))
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)

