"""π_ref: a frozen reference model, and reference log-probs precomputed once per run.

* :func:`load_reference` loads a snapshot folder (or any Hugging Face id) frozen, in eval mode.
* :func:`reference_id` names a reference: the ``id`` in its ``manifest.json`` when it has one,
  else ``sha256:`` of its weight files, else the id string as given.
* :func:`precompute_reference_logps` scores every training example (and its fixed KL pair)
  under π_ref once, so a training step needs two policy forwards instead of four. With LoRA,
  pass ``adapter_disabled=True``: the policy itself with its adapter disabled is π_ref (the
  weights the adapter was added to). Under several processes each scores a shard and the
  results are summed across processes, so every process ends with the whole table.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch

from .data import Plan, TokenizedExample, collate_microbatch
from .logprobs import sequence_logps
from .packing import bucket_pack, pack_examples, pack_to, packed_sequence_logps


def load_reference(path_or_id: str | Path, dtype: torch.dtype | None = None, device=None, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=dtype or torch.float32, **kwargs)
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def reference_id(path_or_id: str | Path | None) -> str | None:
    if path_or_id is None:
        return None
    p = Path(str(path_or_id))
    if p.is_dir():
        man = p / "manifest.json"
        if man.exists():
            try:
                data = json.loads(man.read_text())
                if data.get("id"):
                    return str(data["id"])
            except ValueError:
                pass
        h = hashlib.sha256()
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        for f in files:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
        if files:
            return "sha256:" + h.hexdigest()
    return str(path_or_id)


def data_fingerprint(data: Sequence[TokenizedExample], plan: Plan, ref_id: str | None) -> str:
    """What a run trains on: π_ref, the examples and their KL partners (a resumed checkpoint and a
    cached reference table must match it). One pass over the data; hash it once per run."""
    h = hashlib.sha256()
    h.update(str(ref_id).encode())
    for i, e in enumerate(data):
        h.update(json.dumps([e.prompt_ids, e.completion_ids, plan.partner[i]]).encode())
    return h.hexdigest()


def table_fingerprint(data_fp: str, scoring: dict) -> str:
    """What a cached reference table was computed from: the data (:func:`data_fingerprint`) and
    ``scoring``, every setting that changes the values (truncation of the KL pairs, whether they
    are scored at all, packing, buckets, precision), so that a run with other settings in the
    same folder computes its own table instead of reusing a stale one."""
    return hashlib.sha256(json.dumps([data_fp, scoring], sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def precompute_reference_logps(
    model,
    data: Sequence[TokenizedExample],
    plan: Plan,
    pad_id: int,
    batch_size: int = 16,
    chunk_size: int = 1024,
    max_length: int | None = None,
    adapter_disabled: bool = False,
    autocast=None,
    packing: bool = False,
    attn_backend: str = "auto",
    share_prompt: bool = True,
    with_kl: bool = True,
    bucket: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_logps[n], ref_kl_logps[n]) float32 on CPU: log πref(y_i|x_i), log πref(y_partner(i)|x_i).

    ``packing``: padding-free forwards over the plan's own microbatches (the model must be switched
    with :func:`worker.kto.packing.packed_attention`). Scoring exactly the groups training will
    run keeps the packed shapes, hence the kernels' rounding, the same, so at step 1 the policy's
    log-probs equal these bit for bit where the kernels are deterministic (``bucket``: padded
    as training pads them, for the same reason). Without ``with_kl`` the KL column is left at
    zero."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    device = next(model.parameters()).device
    n = len(data)
    ref = torch.zeros(n, dtype=torch.float32, device=device)
    ref_kl = torch.zeros(n, dtype=torch.float32, device=device)
    mine = list(range(rank, n, world))
    was_training = model.training
    model.eval()
    ctx = model.disable_adapter() if adapter_disabled else nullcontext()
    with ctx, (autocast() if autocast else nullcontext()):
        for mb in (plan.microbatches[rank::world] if packing else ()):
            pk = pack_to(bucket_pack(pack_examples(data, mb, plan, max_length, kl=with_kl, share_prompt=share_prompt),
                                     bucket, max_length), device)
            lp, kl = packed_sequence_logps(model, pk, chunk_size, attn_backend)
            ref[mb] = lp.float()
            if kl is not None:
                ref_kl[mb] = kl.float()
        for s in (range(0, len(mine), batch_size) if not packing else ()):
            idx = mine[s: s + batch_size]
            b = {k: v.to(device) for k, v in collate_microbatch(data, idx, plan, pad_id, max_length).items()}
            ref[idx] = sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"], chunk_size).float()
            ref_kl[idx] = sequence_logps(
                model, b["kl_input_ids"], b["kl_attention_mask"], b["kl_completion_mask"], chunk_size
            ).float()
    if was_training:
        model.train()
    if world > 1:
        torch.distributed.all_reduce(ref)
        torch.distributed.all_reduce(ref_kl)
    return ref.cpu(), ref_kl.cpu()
