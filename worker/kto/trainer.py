"""The KTO training loop, on accelerate.

Entry point: :func:`train_kto(config, model, examples, out_dir, ...) <train_kto>`.

* AdamW, linear warmup then linear/cosine decay (or constant), gradient accumulation,
  gradient clipping, bf16 autocast on GPU, optional gradient checkpointing, full fine-tune or
  LoRA (peft) with a merged copy of the result.
* π_ref: by default the starting weights; their log-probs (and the fixed KL pairs') are
  precomputed once and cached in ``out_dir/reference_logps.pt``. With LoRA, π_ref is the
  policy with its adapter disabled. ``reference=`` names another snapshot.
* A callback gets a dict of metrics after every optimizer step; ``should_stop`` (a callable
  or a ``threading.Event``) is checked between steps; a cancelled run saves a checkpoint.
* Checkpoints: ``out_dir/checkpoints/step-XXXXXXXX/`` Hugging Face folders (safetensors +
  tokenizer + ``manifest.json`` + ``trainer_state.pt``), written to a temporary folder and
  renamed into place. ``resume=True`` continues from the newest one (weights, optimizer,
  scheduler, RNG, data position); one written with other training settings, data, π_ref or
  process count is refused (speed, memory and checkpoint settings may change). The final
  model goes to ``out_dir/final`` (for LoRA: the merged model there, the adapter in
  ``out_dir/adapter``).
* Several processes (``accelerate launch``, DDP; gloo on CPU): each process takes its own
  microbatch of a step; z0 and the logged metrics are averaged across processes.
* Throughput (``worker.kto.packing``): padding-free packed microbatches (on by default on CUDA),
  the KL forward reusing the policy forward's prompt keys/values, optional Liger layer kernels,
  regional ``torch.compile``, fused AdamW and CUDA-graph replay of whole steps
  (``worker.kto.graphed``). They change speed and memory, not the numbers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .data import (
    FeedbackExample,
    as_examples,
    collate_microbatch,
    make_plan,
    tokenize_examples,
)
from .lm_head import DEFAULT_GRAD_CACHE_GIB
from .logprobs import check_scoring, lm_head_impl, sequence_logps
from .loss import all_reduce_mean, all_reduce_sum, kto_loss, metrics_from_sums
from .packing import (
    apply_liger,
    bucket_pack,
    compile_layers,
    liger_available,
    pack_examples,
    pack_to,
    packed_attention,
    packed_sequence_logps,
)
from .readout import StepReadout
from .reference import (
    data_fingerprint,
    load_reference,
    precompute_reference_logps,
    reference_id,
    sha256_file,
    table_fingerprint,
)

MANIFEST_FORMAT = "prospect.checkpoint/v1"
#: settings a resumed run may change: speed, memory and checkpointing, not the numbers or the data order
_RESUME_FREE = {"mixed_precision", "gradient_checkpointing", "logits_chunk_size", "lm_head", "lm_head_grad_cache_gib",
                "precompute_reference", "packing", "attn_backend", "share_prompt_kv", "liger_kernels",
                "compile_layers", "fused_adamw", "cuda_graphs", "pack_bucket", "save_every_steps",
                "keep_checkpoints", "save_final"}
log = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    #: None: every linear layer of the backbone ("all-linear"; never the LM head)
    target_modules: list[str] | None = None


@dataclass
class KTOTrainConfig:
    # the loss
    beta: float = 0.1
    lambda_d: float = 1.0
    lambda_u: float = 1.0
    use_reference_point: bool = True  # False: the paper's z0 = 0 ablation
    # optimisation
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: str = "linear"  # linear | cosine | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    num_epochs: int = 1
    max_steps: int | None = None
    microbatch_size: int = 8  # per process; the KL pairs live inside it
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    # data
    max_length: int | None = 1024
    max_prompt_length: int | None = None  # default max_length // 2
    shuffle: bool = True  # seeded microbatch membership + per-epoch microbatch order
    seed: int = 0
    # hardware / memory
    mixed_precision: str = "auto"  # auto (bf16 on GPU) | no | bf16
    gradient_checkpointing: bool = False
    logits_chunk_size: int = 1024
    #: LM-head log-probs: "fused" (hand-written chunked backward, worker.kto.lm_head; compiled passes
    #: on CUDA) | "fused-eager" | "checkpoint" (autograd with activation checkpointing)
    lm_head: str = "fused"
    #: the fused LM head keeps the logits' gradient (rows × vocabulary in the compute dtype) from
    #: forward to backward when it fits in this many GiB, saving the backward's recompute; over it,
    #: the backward recomputes it in groups of that size, one gradient product per group (0: neither)
    lm_head_grad_cache_gib: float = DEFAULT_GRAD_CACHE_GIB
    lora: LoraSettings | None = None
    precompute_reference: bool = True
    #: p = 0 on every dropout of the policy, as TRL's KTOTrainer does by default: π_ref is scored
    #: without dropout, so with it the policy's step-1 rewards are noise, not 0
    disable_dropout: bool = True
    # throughput (issue 4); none of these changes the loss, only speed and memory
    #: padding-free microbatches: "auto" = on for CUDA, off on CPU (slower there: docs/benchmarks.md)
    packing: bool | str = "auto"
    attn_backend: str = "auto"  # packed attention: auto | varlen | flex | sdpa (worker.kto.packing)
    share_prompt_kv: bool = True  # packed KL forward reuses the policy forward's prompt keys/values
    #: Liger RMSNorm/SwiGLU/RoPE kernels: "auto" = on for CUDA when liger_kernel imports (the `gpu` extra)
    liger_kernels: bool | str = "auto"
    compile_layers: bool = False  # torch.compile each decoder layer (pays on long runs only)
    fused_adamw: bool | str = "auto"  # AdamW's fused kernel: "auto" = on for CUDA
    #: replay each optimizer step as one CUDA graph where pack shapes repeat (worker.kto.graphed);
    #: needs CUDA, packing with varlen attention, one process and one microbatch per step.
    #: "auto": on where all that holds and the run is a full fine-tune, for shapes that make at
    #: least half the steps (fixed lengths, or pack_bucket); True also for LoRA and rarer shapes
    cuda_graphs: bool | str = "auto"
    #: pad packed microbatches to multiples of this many tokens (0: off), so that variable-length
    #: data falls into a few shapes a CUDA graph can replay (worker.kto.packing.bucket_pack)
    pack_bucket: int = 0
    # checkpoints
    save_every_steps: int | None = None
    keep_checkpoints: int = 2
    save_final: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KTOTrainConfig":
        d = dict(d)
        if isinstance(d.get("lora"), dict):
            d["lora"] = LoraSettings(**d["lora"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class TrainResult:
    status: str  # completed | cancelled
    step: int
    total_steps: int
    examples_seen: int
    final_dir: Path | None
    adapter_dir: Path | None
    last_checkpoint: Path | None
    history: list[dict]
    data_stats: dict
    model: Any = None  # the trained (merged, for LoRA) model, unwrapped
    #: what ran: packing, Liger kernels, CUDA graphs (and how many steps were replayed from one)
    runtime: dict = field(default_factory=dict)


class Cancelled(Exception):
    pass


# --------------------------------------------------------------------------- helpers

def _lr_lambda(cfg: KTOTrainConfig, total_steps: int) -> Callable[[int], float]:
    warm = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if warm and step < warm:
            return step / max(1, warm)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        progress = min(1.0, max(0.0, progress))
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.lr_scheduler == "linear":
            return 1.0 - progress
        raise ValueError(f"unknown lr_scheduler {cfg.lr_scheduler!r}")

    return f


def disable_dropout(model) -> int:
    """Set every dropout of ``model`` to 0 (LoRA's included); returns how many. Many
    transformers modules keep their rate as a float (``attention_dropout`` handed to the
    attention function; ``dropout`` for ``nn.functional.dropout``, as OPT's layers), not as an
    nn.Dropout, so those are zeroed too (TRL's helper misses them). The saved config keeps its
    rates: only this training run goes without."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p:
            m.p = 0.0
            n += 1
        for name in ("attention_dropout", "dropout"):
            rate = getattr(m, name, None)
            if isinstance(rate, float) and rate:
                setattr(m, name, 0.0)
                n += 1
    return n


def _stop_requested(should_stop) -> bool:
    if should_stop is None:
        return False
    if isinstance(should_stop, threading.Event) or hasattr(should_stop, "is_set"):
        return bool(should_stop.is_set())
    return bool(should_stop())


def _rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def write_manifest(folder: Path, info: dict) -> dict:
    """manifest.json: sha256 of every file in ``folder`` (recursively, except the manifest)
    plus ``info`` (hyperparameters, data counts, reference id, ...)."""
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != "manifest.json":
            files[str(f.relative_to(folder))] = sha256_file(f)
    man = {"format": MANIFEST_FORMAT, **info, "files": files}
    (folder / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True, default=str))
    return man


def verify_manifest(folder: str | Path) -> bool:
    """True when every file listed in the manifest exists with the recorded sha256 and the folder
    holds no file the manifest does not list (one added later changes what loads)."""
    folder = Path(folder)
    try:
        man = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    listed = man.get("files")
    if not isinstance(listed, dict) or not listed:
        return False
    present = {str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() and f.name != "manifest.json"}
    if present != set(listed):
        return False
    return all((folder / n).is_file() and sha256_file(folder / n) == h for n, h in listed.items())


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling folder, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        # A full disk or a kill mid-write: leave no half-written folder taking space.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    cks = sorted(p for p in root.glob("step-*") if (p / "manifest.json").exists() and (p / "trainer_state.pt").exists())
    return cks[-1] if cks else None


class _LogpsModule(torch.nn.Module):
    """Wraps the causal LM so that one (DDP-wrapped) forward returns the policy's sequence
    log-probs (with grad) and the KL pairs' (without): the chunked LM head runs inside it.
    ``packed`` (from :func:`worker.kto.packing.pack_examples`) takes the padding-free path."""

    def __init__(self, model, chunk_size: int, attn_backend: str = "auto"):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.attn_backend = attn_backend

    def forward(self, input_ids=None, attention_mask=None, completion_mask=None, kl_input_ids=None,
                kl_attention_mask=None, kl_completion_mask=None, packed: dict | None = None):
        if packed is not None:
            return packed_sequence_logps(self.model, packed, self.chunk_size, self.attn_backend)
        logps = sequence_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size)
        kl = None
        if kl_input_ids is not None:
            with torch.no_grad():
                kl = sequence_logps(self.model, kl_input_ids, kl_attention_mask, kl_completion_mask, self.chunk_size)
        return logps, kl


def _lora_targets(model) -> list[str]:
    names = set()
    out_emb = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not out_emb:
            names.add(name.split(".")[-1])
    return sorted(names)


def resolve_packing(cfg: KTOTrainConfig, device: torch.device) -> bool:
    """``packing="auto"``: on for CUDA (padding costs about half the compute with chat-like
    lengths), off on CPU, where the per-sequence attention loop is slower than padded SDPA."""
    if isinstance(cfg.packing, str):
        if cfg.packing != "auto":
            raise ValueError(f"packing must be true, false or 'auto', not {cfg.packing!r}")
        return torch.device(device).type == "cuda"
    return bool(cfg.packing)


def resolve_liger(cfg: KTOTrainConfig, device: torch.device) -> bool:
    """Whether Liger's layer kernels go on: ``"auto"`` = on for CUDA where ``liger_kernel``
    imports (measured on an H100: +32% tokens/s at varlen-b32, docs/benchmarks.md). Never with
    ``compile_layers``: Dynamo (torch 2.11) fails tracing Liger's RMSNorm function, and Inductor
    fuses those layers itself."""
    want = cfg.liger_kernels
    if isinstance(want, str) and want != "auto":
        raise ValueError(f"liger_kernels must be true, false or 'auto', not {want!r}")
    if want is False or torch.device(device).type != "cuda":
        return False
    if cfg.compile_layers:
        if want is True:
            log.warning("liger_kernels is ignored with compile_layers (torch.compile cannot trace Liger's kernels)")
        return False
    return liger_available() if want == "auto" else True


def resolve_cuda_graphs(cfg: KTOTrainConfig, device: torch.device, world: int = 1, model_config: Any = None) -> bool:
    """Whether the step is replayed as a CUDA graph (worker.kto.graphed): ``True`` where everything
    it needs holds, a request that cannot be met is logged and ignored; ``"auto"`` likewise
    without the log, for full fine-tunes only (graphs around LoRA are not measured yet)."""
    want = cfg.cuda_graphs
    if isinstance(want, str) and want != "auto":
        raise ValueError(f"cuda_graphs must be true, false or 'auto', not {want!r}")
    if want is False:
        return False
    if want == "auto" and cfg.lora is not None:
        return False
    unmet = [why for bad, why in (
        (torch.device(device).type != "cuda", "a CUDA device"),
        (not resolve_packing(cfg, device), "packing"),
        (world > 1, "one process"),
        (cfg.grad_accum_steps != 1, "grad_accum_steps=1"),
        (not cfg.precompute_reference, "precompute_reference"),
        (cfg.gradient_checkpointing, "no gradient_checkpointing"),
        (cfg.compile_layers, "no compile_layers"),
        (cfg.lm_head == "checkpoint" or getattr(model_config, "final_logit_softcapping", None) is not None,
         "the fused LM head (activation checkpointing reads the RNG state back; softcapped models use it)"),
    ) if bad]
    if unmet:
        if want is True:
            log.warning("cuda_graphs is ignored: it needs %s", ", ".join(unmet))
        return False
    return True


def _make_optimizer(cfg: KTOTrainConfig, params: list, device: torch.device) -> torch.optim.Optimizer:
    fused = cfg.fused_adamw
    if isinstance(fused, str):
        fused = torch.device(device).type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))


# --------------------------------------------------------------------------- the loop

def train_kto(
    config: KTOTrainConfig,
    model: str | Path | Any,
    examples: Sequence[FeedbackExample | dict],
    out_dir: str | Path,
    tokenizer=None,
    reference: str | Path | Any | None = None,
    reference_name: str | None = None,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | threading.Event | None = None,
    resume: bool = True,
    accelerator=None,
    extra_manifest: dict | None = None,
) -> TrainResult:
    """Train ``model`` (a Hugging Face id, a local folder, or a loaded causal LM) with KTO on
    ``examples`` and write checkpoints + the final model under ``out_dir``.

    ``reference``: π_ref (id, folder or model); default: the starting weights of ``model``
    (or, with LoRA, the model with the adapter disabled). ``reference_name`` is recorded in the
    manifest as the π_ref id (default: derived from the reference folder / model path).
    """
    # the stack restores what training switched on the models (packed attention) however it ends
    with contextlib.ExitStack() as stack:
        stack.enter_context(lm_head_impl(config.lm_head, config.lm_head_grad_cache_gib))
        return _train_kto(config, model, examples, out_dir, tokenizer, reference, reference_name, callback,
                          should_stop, resume, accelerator, extra_manifest, stack)


def _train_kto(
    config: KTOTrainConfig,
    model: str | Path | Any,
    examples: Sequence[FeedbackExample | dict],
    out_dir: str | Path,
    tokenizer=None,
    reference: str | Path | Any | None = None,
    reference_name: str | None = None,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | threading.Event | None = None,
    resume: bool = True,
    accelerator=None,
    extra_manifest: dict | None = None,
    stack: contextlib.ExitStack | None = None,
) -> TrainResult:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config
    out_dir = Path(out_dir)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    if accelerator is None:
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        # "no" is left implicit: an AcceleratorState made earlier in the process (another trainer)
        # would otherwise refuse the explicit flag
        accelerator = Accelerator(**({} if mp == "no" else {"mixed_precision": mp}))
        if accelerator.mixed_precision != mp:
            raise RuntimeError(
                f"this process already holds an AcceleratorState with mixed_precision="
                f"{accelerator.mixed_precision!r} (another trainer made it); the config asks {mp!r}. "
                "Run training in a fresh process or pass a matching accelerator."
            )
    acc = accelerator
    device, world, rank = acc.device, acc.num_processes, acc.process_index

    # ---- model + tokenizer
    model_id = str(model) if isinstance(model, (str, Path)) else getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(model, (str, Path)):
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(model))
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    if tokenizer is None:
        raise ValueError("pass a tokenizer with a loaded model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    model.config.use_cache = False

    # ---- data
    examples = as_examples(examples)
    data, stats = tokenize_examples(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    plan = make_plan(len(data), cfg.microbatch_size, seed=cfg.seed, shuffle=cfg.shuffle)
    slots_per_step = world * cfg.grad_accum_steps
    steps_per_epoch = max(1, math.ceil(len(plan.microbatches) / slots_per_step))
    total_steps = cfg.max_steps if cfg.max_steps is not None else steps_per_epoch * cfg.num_epochs

    use_packing = resolve_packing(cfg, device)
    if cfg.pack_bucket < 0 or cfg.pack_bucket % 16:
        # multiples of 16: Triton specialises integer arguments on divisibility by 16, so other
        # sizes would compile new kernels, inside a CUDA-graph capture at worst
        raise ValueError(f"pack_bucket must be 0 or a positive multiple of 16, not {cfg.pack_bucket}")
    if cfg.pack_bucket and not use_packing:
        log.warning("pack_bucket is ignored without packing")
    liger = apply_liger(model) if resolve_liger(cfg, device) else False  # before LoRA wraps the layers

    # ---- LoRA
    is_lora = cfg.lora is not None
    if is_lora:
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        model = get_peft_model(model, LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
            target_modules=lc.target_modules or _lora_targets(model), task_type="CAUSAL_LM",
        ))
    model.to(device)
    if cfg.disable_dropout:
        disable_dropout(model)
    if data:  # before a step runs on wrong rewards: the LM head scores as the model's forward does
        check_scoring(model, torch.tensor((data[0].prompt_ids + data[0].completion_ids)[:64]))
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_lora and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    # ---- reference
    ref_model = None
    if reference is None:
        ref_name = reference_name or (reference_id(model_id) if model_id else None)
        if is_lora:
            ref_mode = "adapter_disabled"
        elif cfg.precompute_reference:
            ref_mode = "initial_policy"  # scored before the first update
        else:
            ref_mode = "model"
            ref_model = copy.deepcopy(model).requires_grad_(False).eval()
    else:
        ref_name = reference_name or reference_id(reference if isinstance(reference, (str, Path)) else
                                                  getattr(reference.config, "_name_or_path", None))
        ref_model = load_reference(reference) if isinstance(reference, (str, Path)) else reference
        ref_model.requires_grad_(False).eval().to(device)
        ref_mode = "model"
        if liger:
            apply_liger(ref_model)
    if use_packing:
        stack.enter_context(packed_attention(model, ref_model))

    data_fp = data_fingerprint(data, plan, ref_name)  # the reference table's key and the resume key
    ref_logps = ref_kl_logps = None
    if cfg.precompute_reference:
        fp = table_fingerprint(data_fp, {
            "max_length": cfg.max_length, "with_kl": cfg.use_reference_point, "packing": use_packing,
            "share_prompt": cfg.share_prompt_kv, "bucket": cfg.pack_bucket, "attn_backend": cfg.attn_backend,
            "microbatch_size": cfg.microbatch_size, "precision": str(acc.mixed_precision),
            "logits_chunk_size": cfg.logits_chunk_size, "lm_head": cfg.lm_head})
        cache = out_dir / "reference_logps.pt"
        loaded = None
        if cache.exists() and ref_name:  # an unnamed π_ref (a loaded model without a path) has no key to match
            loaded = torch.load(cache, weights_only=True)
            if loaded.get("fingerprint_hash") != fp[:32] or loaded["ref"].shape[0] != len(data):
                loaded = None
        if loaded is None:
            scorer = ref_model if ref_mode == "model" else model
            ref_logps, ref_kl_logps = precompute_reference_logps(
                scorer, data, plan, pad_id, batch_size=max(1, cfg.microbatch_size), chunk_size=cfg.logits_chunk_size,
                max_length=cfg.max_length, adapter_disabled=(ref_mode == "adapter_disabled"), autocast=acc.autocast,
                packing=use_packing, attn_backend=cfg.attn_backend, share_prompt=cfg.share_prompt_kv,
                with_kl=cfg.use_reference_point, bucket=cfg.pack_bucket,
            )
            if acc.is_main_process:
                out_dir.mkdir(parents=True, exist_ok=True)
                tmp = out_dir / f".reference_logps.{os.getpid()}.pt"
                torch.save({"fingerprint_hash": fp[:32], "ref": ref_logps, "ref_kl": ref_kl_logps}, tmp)
                os.replace(tmp, cache)
        else:
            ref_logps, ref_kl_logps = loaded["ref"], loaded["ref_kl"]
        ref_model = None  # not needed any more: every reference value is in the table
        acc.wait_for_everyone()

    if cfg.compile_layers:  # after the reference copy and scoring: those run eager
        compile_layers(model)

    # ---- optimiser
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(cfg, params, device)
    capturable = [bool(g.get("capturable", False)) for g in optimizer.param_groups]  # before CUDA graphs change it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))

    # ---- resume
    step, examples_seen = 0, 0
    history: list[dict] = []
    ckpt = latest_checkpoint(out_dir) if resume else None
    # what a checkpoint's step, optimizer state and data position mean: a resume must match it
    run_key = {"hyperparameters": {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_FREE},
               "data": data_fp, "world_size": world}
    if ckpt is not None:
        st = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        saved = st.get("run")  # None: written before the key was recorded
        if saved is not None and saved != run_key:
            changed = sorted(k for k in set(saved["hyperparameters"]) | set(run_key["hyperparameters"])
                             if saved["hyperparameters"].get(k) != run_key["hyperparameters"].get(k))
            changed += [k for k in ("data", "world_size") if saved.get(k) != run_key[k]]
            raise ValueError(f"{ckpt} was written by a run with other settings ({', '.join(changed)} changed): "
                             "resume with the same settings, or start over (resume=False) or in another folder")
        _load_weights(model, ckpt, is_lora)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        step, examples_seen = st["step"], st["examples_seen"]
        rngs = st["rng"]
        _set_rng_state(rngs[rank] if isinstance(rngs, list) and rank < len(rngs) else rngs)

    wrapper = acc.prepare(_LogpsModule(model, cfg.logits_chunk_size, cfg.attn_backend))
    wrapper.train()

    def unwrapped():
        return acc.unwrap_model(wrapper).model

    def runtime() -> dict:
        return {"packing": use_packing, "liger_kernels": liger, "cuda_graphs": graphs is not None,
                "cuda_graph_captures": graphs.captures if graphs is not None else 0,
                "cuda_graph_replays": graphs.replays if graphs is not None else 0}

    def manifest_info(kind: str, metrics: dict | None = None) -> dict:
        return {
            "kind": kind,
            "step": step,
            "total_steps": total_steps,
            "examples_seen": examples_seen,
            "base_model": model_id,
            "reference_id": ref_name,
            "reference_mode": ref_mode,
            "hyperparameters": cfg.to_dict(),
            "data": {**stats.as_dict(), "n_microbatches": len(plan.microbatches),
                     "steps_per_epoch": steps_per_epoch, "world_size": world},
            "runtime": runtime(),
            "metrics": metrics or {},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra_manifest or {}),
        }

    def save_checkpoint(metrics: dict | None) -> Path:
        rng_all = _gather_rng(world)
        path = out_dir / "checkpoints" / f"step-{step:08d}"
        if acc.is_main_process:
            def write(tmp: Path):
                m = unwrapped()
                m.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                torch.save({"optimizer": _portable_state(optimizer, capturable), "scheduler": scheduler.state_dict(),
                            "step": step, "examples_seen": examples_seen, "rng": rng_all, "run": run_key},
                           tmp / "trainer_state.pt")
                write_manifest(tmp, manifest_info("lora-adapter" if is_lora else "full", metrics))
            _atomic_dir(path, write)
            # later steps than this one are another run's (one started over with resume=False):
            # kept, they would outrank this run's checkpoints here and in latest_checkpoint
            cks = sorted(p for p in (out_dir / "checkpoints").glob("step-*") if p.name <= path.name)
            later = [p for p in (out_dir / "checkpoints").glob("step-*") if p.name > path.name]
            for old in later + cks[: max(0, len(cks) - max(1, cfg.keep_checkpoints))]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def host_batches(at_step: int) -> list[tuple[list[int], dict]]:
        """The microbatches of optimizer step ``at_step``, packed or collated on the host. The loop
        builds the next step's while the device still runs the current one, so it never waits
        for Python packing."""
        epoch, in_epoch = divmod(at_step, steps_per_epoch)
        order = plan.epoch_order(epoch) if cfg.shuffle else list(range(len(plan.microbatches)))
        out = []
        for k in range(cfg.grad_accum_steps):
            if in_epoch * slots_per_step + k * world >= len(order):
                break  # the epoch's last step accumulates only what is left: each example once an epoch
            slot = in_epoch * slots_per_step + k * world + rank
            # several processes must each run as many microbatches (their gradients are reduced
            # together): where the epoch runs out on some, they repeat its first ones, as
            # accelerate's even_batches does, and do not count them as seen
            repeat = slot >= len(order)
            mb = plan.microbatches[order[slot % len(order)]]
            if use_packing:
                b = bucket_pack(pack_examples(data, mb, plan, cfg.max_length, kl=cfg.use_reference_point,
                                              share_prompt=cfg.share_prompt_kv), cfg.pack_bucket, cfg.max_length)
                b["n_real"] = b["n_tokens"] + (b["kl_tokens"] if cfg.use_reference_point else 0)
            else:
                b = collate_microbatch(data, mb, plan, pad_id, cfg.max_length)
                b["n_real"] = int(b["attention_mask"].sum()) + (
                    int(b["kl_attention_mask"].sum()) if cfg.use_reference_point else 0)
            b["index"] = torch.tensor(mb, dtype=torch.long)
            b["desirable"] = torch.tensor([data[i].desirable for i in mb], dtype=torch.bool)
            b["repeat"] = repeat
            out.append((mb, b))
        return out

    if ref_logps is not None:  # the whole table on the device: indexing it needs no host round trip
        ref_logps, ref_kl_logps = ref_logps.to(device), ref_kl_logps.to(device)

    def microbatch_loss(batch: dict[str, Any]):
        """Forward (policy and KL) and the KTO loss of one microbatch on the device."""
        with acc.autocast():
            if use_packing:
                pol, pol_kl = wrapper(packed=batch)
            else:
                pol, pol_kl = wrapper(
                    batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                    *((batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"])
                      if cfg.use_reference_point else ()),
                )
        if cfg.precompute_reference:
            ref, ref_kl = ref_logps[batch["index"]], ref_kl_logps[batch["index"]]
        else:
            ref, ref_kl = _score_reference(ref_model, unwrapped(), ref_mode, batch, cfg, acc, use_packing)
        return kto_loss(pol, ref, batch["desirable"], pol_kl, ref_kl, beta=cfg.beta, lambda_d=cfg.lambda_d,
                        lambda_u=cfg.lambda_u, use_reference_point=cfg.use_reference_point)

    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")

    def graphed_step(batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The whole step of one microbatch, as a CUDA graph records it (no host sync inside)."""
        out = microbatch_loss(batch)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        optimizer.step()
        return out.loss.detach().float(), out.z0.float(), out.stat_sums, grad_norm

    graphs = None
    use_graphs = resolve_cuda_graphs(cfg, device, world, getattr(unwrapped(), "config", None))
    if use_graphs and getattr(acc, "scaler", None) is not None:  # fp16: the loss scale lives outside the step
        use_graphs = False
        if cfg.cuda_graphs is True:
            log.warning("cuda_graphs is ignored with a gradient scaler (fp16 mixed precision); use bf16")
    if use_graphs:
        from .graphed import StepGraphs

        # bucketed packs take a handful of shapes; without buckets only repeating data gains, and
        # "auto" records only a shape that makes half the steps (fixed-length data)
        graphs = StepGraphs(graphed_step, optimizer, device, max_graphs=64 if cfg.pack_bucket else 2,
                            expect_repeats=bool(cfg.pack_bucket and use_packing),
                            min_share=0.5 if cfg.cuda_graphs == "auto" else 0.0)
    lr_at = _lr_lambda(cfg, total_steps)
    base_lr = float(scheduler.base_lrs[0])  # the scheduler's (a resumed run keeps the checkpoint's)

    # ---- train
    status = "completed"
    last_ckpt = ckpt
    metrics: dict = {}
    t_last = time.perf_counter()
    # loss, kl, grad norm, the six reward/log-prob sums (+ tokens and examples across processes)
    readout = StepReadout(device, n_values=9 + (2 if world > 1 else 0))

    def emit(values: list[float], meta: dict[str, Any]) -> None:
        """A step's metrics, once its values reached the host (a step late on CUDA)."""
        nonlocal examples_seen, t_last, metrics
        loss_v, kl_v, norm_v, *rest = values
        n_tok, n_seen = (rest[6], rest[7]) if world > 1 else (meta["n_tokens"], meta["n_examples"])
        examples_seen += int(n_seen)
        now = time.perf_counter()
        seconds = meta.get("device_step_s") or (now - t_last)
        metrics = {
            "step": meta["step"], "total_steps": total_steps, "epoch": meta["step"] / steps_per_epoch,
            "loss": loss_v, "kl": kl_v, **metrics_from_sums(torch.tensor(rest[:6])),
            "grad_norm": norm_v, "lr": meta["lr"],
            "tokens_per_s": float(n_tok) / max(1e-9, seconds), "examples_seen": examples_seen,
            **({"step_mode": meta["step_mode"]} if "step_mode" in meta else {}),
            **({"device_step_s": meta["device_step_s"]} if "device_step_s" in meta else {}),
        }
        t_last = now
        history.append(metrics)
        if callback is not None and acc.is_main_process:
            callback(dict(metrics))

    # With CUDA graphs every step runs on the capture stream, the eager ones before the first capture
    # too: autograd nodes keep the stream they were made on (the parameters' AccumulateGrad among
    # them), and a backward captured on another stream than its warm-up steps waits on the legacy
    # stream, which fails the capture (cudaErrorStreamCaptureImplicit, pytorch/pytorch#164302).
    step_stream = graphs.stream if graphs is not None else None
    if step_stream is not None:
        step_stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(step_stream) if step_stream is not None else nullcontext():
        pending = host_batches(step) if step < total_steps else []
        while step < total_steps:
            if _all_any(_stop_requested(should_stop), device):
                status = "cancelled"
                break
            current, pending = pending, []
            lr = base_lr * lr_at(step)  # LambdaLR's value for this step, without reading a device tensor back
            replayed = None
            if graphs is not None:
                graphs.set_lr(lr)
                replayed = graphs.run(current[0][1])
            host_tokens = sum(int(host["n_real"]) for _, host in current if not host["repeat"])
            host_examples = sum(len(mb) for mb, host in current if not host["repeat"])
            if replayed is not None:
                loss_sum, z0_sum, stat_sums, grad_norm = replayed
            else:
                stat_sums = torch.zeros(6, device=device)
                loss_sum = torch.zeros((), device=device)
                z0_sum = torch.zeros((), device=device)
                for k, (mb, host) in enumerate(current):
                    batch = pack_to(host, device)
                    sync = k == len(current) - 1
                    with (nullcontext() if sync or world == 1 else acc.no_sync(wrapper)):
                        out = microbatch_loss(batch)
                        acc.backward(out.loss / len(current))
                    stat_sums += out.stat_sums
                    loss_sum += out.loss.detach().float()
                    z0_sum += out.z0.float()
                grad_norm = acc.clip_grad_norm_(params, max_norm)
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            values = [all_reduce_mean(loss_sum / len(current)), z0_sum / len(current),
                      torch.as_tensor(grad_norm, device=device), all_reduce_sum(stat_sums)]
            if world > 1:  # torch.full, not torch.tensor: a fill kernel, no copy that waits
                values += [all_reduce_sum(torch.full((), float(host_tokens), device=device)),
                           all_reduce_sum(torch.full((), float(host_examples), device=device))]
            readout.submit(values, {"step": step, "lr": float(lr), "n_tokens": host_tokens, "n_examples": host_examples,
                                    **({"step_mode": graphs.mode} if graphs is not None else {})})
            if step < total_steps:
                pending = host_batches(step)  # host work that overlaps the device's work on this step
            for done in readout.ready():  # the previous step's values, which the device has usually passed
                emit(*done)
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and step < total_steps:
                for done in readout.drain():
                    emit(*done)
                last_ckpt = save_checkpoint(metrics)
        for done in readout.drain():
            emit(*done)
    if step_stream is not None:  # what follows (saving, evaluation) runs on the default stream again
        torch.cuda.current_stream(device).wait_stream(step_stream)

    final_dir = adapter_dir = None
    if status == "cancelled":
        if step > 0 and (last_ckpt is None or not last_ckpt.name.endswith(f"{step:08d}")):
            last_ckpt = save_checkpoint(metrics)
        return TrainResult(status, step, total_steps, examples_seen, None, None, last_ckpt, history,
                           stats.as_dict(), unwrapped(), runtime())

    final_model = unwrapped()
    if cfg.save_final:
        if is_lora:
            adapter_dir = out_dir / "adapter"
            if acc.is_main_process:
                def write_adapter(tmp: Path):
                    final_model.save_pretrained(tmp, safe_serialization=True)
                    tokenizer.save_pretrained(tmp)
                    write_manifest(tmp, manifest_info("lora-adapter", metrics))
                _atomic_dir(adapter_dir, write_adapter)
            acc.wait_for_everyone()
            final_model = final_model.merge_and_unload()
        final_dir = out_dir / "final"
        if acc.is_main_process:
            def write_final(tmp: Path):
                final_model.config.use_cache = True
                final_model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                write_manifest(tmp, manifest_info("merged" if is_lora else "full", metrics))
            _atomic_dir(final_dir, write_final)
        acc.wait_for_everyone()
    elif is_lora:
        final_model = final_model.merge_and_unload()
    final_model.eval()
    return TrainResult(status, step, total_steps, examples_seen, final_dir, adapter_dir, last_ckpt, history,
                       stats.as_dict(), final_model, runtime())


def _score_reference(ref_model, policy, ref_mode, batch, cfg, acc, packed: bool = False):
    with torch.no_grad(), acc.autocast():
        ctx = policy.disable_adapter() if ref_mode == "adapter_disabled" else nullcontext()
        m = policy if ref_mode == "adapter_disabled" else ref_model
        with ctx:
            if packed:
                return packed_sequence_logps(m, batch, cfg.logits_chunk_size, cfg.attn_backend)
            ref = sequence_logps(m, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                 cfg.logits_chunk_size)
            ref_kl = None
            if cfg.use_reference_point:
                ref_kl = sequence_logps(m, batch["kl_input_ids"], batch["kl_attention_mask"],
                                        batch["kl_completion_mask"], cfg.logits_chunk_size)
    return ref, ref_kl


def _portable_state(optimizer: torch.optim.Optimizer, capturable: list[bool]) -> dict:
    """The optimizer's state dict as a run without CUDA graphs would write it: the learning rate
    as a number (CUDA graphs keep it in a device tensor) and ``capturable`` as constructed."""
    sd = optimizer.state_dict()  # its param_groups are fresh dicts: editing them leaves the optimizer alone
    for group, cap in zip(sd["param_groups"], capturable):
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        group["capturable"] = cap
    return sd


def _all_any(flag: bool, device) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(flag)  # one process: no collective, no device round trip
    t = torch.tensor(float(flag), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _gather_rng(world: int):
    st = _rng_state()
    if world > 1 and torch.distributed.is_initialized():
        out = [None] * world
        torch.distributed.all_gather_object(out, st)
        return out
    return st


def _load_weights(model, ckpt: Path, is_lora: bool) -> None:
    from safetensors.torch import load_file

    if is_lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
        return
    sd = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        sd.update(load_file(f))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # tied weights are saved once; anything else missing is an error
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not getattr(model.config, "tie_word_embeddings", False)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
