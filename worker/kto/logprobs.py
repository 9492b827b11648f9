"""Sequence log-probabilities log p(y|x), summed over completion tokens, without ever
building ``[B, T, V]`` float32 logits.

The backbone returns hidden states ``[B, T, H]``; only the rows that predict a completion
token are gathered (``[N, H]``, N = completion tokens in the batch), and those go through the
LM head in chunks of ``chunk_size`` rows; each chunk's logits ``[chunk, V]`` are reduced at once
to the target token's log-prob (float32 log-sum-exp) and, unless their gradient was kept from
the forward (``grad_cache_gib``), recomputed in backward, so at most one chunk of float32 logits
is alive: by default with a hand-written backward (worker.kto.lm_head), or
through autograd with activation checkpointing per chunk (``lm_head_impl("checkpoint")``).

The core, :func:`token_logps_from_hidden`, takes flat rows + targets + a sequence id per row,
so a packed / padding-free variant (issue 4) only has to produce those from its own forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .lm_head import DEFAULT_GRAD_CACHE_GIB, chunked_token_logps

LM_HEAD_IMPLS = ("fused", "fused-eager", "checkpoint")
_LM_HEAD: contextvars.ContextVar[tuple[str, int]] = contextvars.ContextVar(
    "prospect_lm_head", default=("fused", int(DEFAULT_GRAD_CACHE_GIB * 2**30)))


@contextlib.contextmanager
def lm_head_impl(impl: str, grad_cache_gib: float = DEFAULT_GRAD_CACHE_GIB) -> Iterator[None]:
    """Which LM-head log-prob path runs inside: ``fused`` (worker.kto.lm_head, the default; its
    passes over the logits compiled on CUDA), ``fused-eager`` (the same in eager ops) or
    ``checkpoint`` (autograd through each chunk with activation checkpointing; also what models
    with logit softcapping always use). ``grad_cache_gib``: the fused paths keep the logits'
    gradient from forward to backward when it fits in this many GiB, else recompute it in
    groups of chunks up to that size (0: always recompute, one chunk at a time)."""
    if impl not in LM_HEAD_IMPLS:
        raise ValueError(f"unknown LM-head implementation {impl!r}; one of {LM_HEAD_IMPLS}")
    if not 0 <= grad_cache_gib < float("inf"):
        raise ValueError(f"grad_cache_gib must be a finite number >= 0, got {grad_cache_gib!r}")
    token = _LM_HEAD.set((impl, int(grad_cache_gib * 2**30)))
    try:
        yield
    finally:
        _LM_HEAD.reset(token)


def _unwrap(model):
    # accelerate/DDP wrappers expose the real model as .module
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    return model


def _logit_transform(config):
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(cfg, "logit_scale", None)  # Cohere: logits · logit_scale
    if scale is None and getattr(cfg, "logits_scaling", None):
        # Granite divides by logits_scaling; HyperCLOVA X (MuP) multiplies by it
        hcx = str(getattr(cfg, "model_type", "")).startswith("hyperclovax")
        scale = cfg.logits_scaling if hcx else 1.0 / cfg.logits_scaling
    if scale is None and getattr(cfg, "lm_head_multiplier", None):  # Falcon-H1: logits · lm_head_multiplier
        scale = cfg.lm_head_multiplier
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), softcap


def _chunk_logps(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias, scale: float, softcap):
    logits = F.linear(h, weight, bias).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps_from_hidden(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, config=None, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(target | hidden row) for flat rows ``hidden [N, H]``, ``targets [N]`` -> ``[N]`` float32."""
    scale, softcap = _logit_transform(config) if config is not None else (1.0, None)
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    impl, cache_bytes = _LM_HEAD.get()
    if not softcap and impl != "checkpoint":
        return chunked_token_logps(hidden, targets, weight, bias, scale, chunk_size,
                                   compiled=None if impl == "fused" else False, grad_cache_bytes=cache_bytes).float()
    outs = []
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s: s + chunk_size], targets[s: s + chunk_size]
        if need_grad:
            outs.append(checkpoint(_chunk_logps, h, t, weight, bias, scale, softcap, use_reentrant=False))
        else:
            outs.append(_chunk_logps(h, t, weight, bias, scale, softcap))
    if not outs:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(outs)


def sequence_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Sum over completion tokens of log p(token | prefix), per sequence -> ``[B]`` float32.

    Padded (right) batches: ``completion_mask[b, t] = 1`` when token t is a completion token.
    Works with plain HF causal LMs, peft-wrapped ones and DDP/accelerate wrappers.
    """
    inner = _unwrap(model)
    backbone = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.model
    lm_head = inner.get_output_embeddings()
    # Calling the backbone through the (possibly DDP-wrapped) model is not possible without
    # computing logits, so the backbone is called directly; DDP gradient sync still happens
    # because the parameters are the same tensors (see trainer: it syncs by hand).
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    target_mask = completion_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    rows = hidden[:, :-1][target_mask]  # [N, H]
    targets = input_ids[:, 1:][target_mask]  # [N]
    seq_id = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(target_mask)[target_mask]
    tok = token_logps_from_hidden(rows, targets, lm_head, inner.config, chunk_size)
    return torch.zeros(input_ids.shape[0], dtype=torch.float32, device=tok.device).index_add(0, seq_id, tok)


def check_scoring(model, input_ids: torch.Tensor) -> float:
    """Raise ValueError where log p(y|x) scored from the hidden states (what training and the
    reference table use) is not the model's own softmax. An architecture that transforms its
    logits in a way ``_logit_transform`` does not know would otherwise train on silently wrong
    rewards. One sequence ``input_ids [T]``, eager, no gradient, in eval mode; returns the mean
    difference per token, in nats."""
    inner = _unwrap(model)
    ids = input_ids.reshape(1, -1).to(next(inner.parameters()).device)
    if ids.shape[1] < 2:
        return 0.0
    ones = torch.ones_like(ids)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), lm_head_impl("checkpoint"):
            ours = sequence_logps(model, ids, ones, ones)
            theirs = naive_sequence_logps(model, ids, ones, ones)
    finally:
        inner.train(was_training)
    diff = float((ours - theirs).abs().sum()) / (ids.shape[1] - 1)
    exact = (next(inner.parameters()).dtype in (torch.float32, torch.float64)
             and torch.get_float32_matmul_precision() == "highest"
             and not torch.backends.cuda.matmul.allow_tf32)
    tol = 1e-3 if exact else 5e-2  # rounding only; a missed transform of trained logits is nats
    if not diff <= tol:
        model_type = getattr(getattr(inner, "config", None), "model_type", "?")
        raise ValueError(
            f"log-probs scored from the hidden states differ from the model's own forward by {diff:.3g} "
            f"nats per token (tolerance {tol:g}): this architecture ({model_type}) transforms its logits "
            "in a way Prospect's LM head does not reproduce, so KTO's rewards would be wrong; "
            "see worker/kto/logprobs.py:_logit_transform")
    return diff


def naive_sequence_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Reference implementation through full float32 logits (tests, and check_scoring's one
    short sequence)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = (completion_mask[:, 1:] * attention_mask[:, 1:]).to(logp.dtype)
    return (logp * mask).sum(-1)
