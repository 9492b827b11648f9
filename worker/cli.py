"""One-off KTO training from a JSONL file: ``prospect train --events f.jsonl --model M --out D``.

``train_command`` is a plain function with typer defaults; the ``prospect`` app in
``service/cli.py`` registers it (``app.command("train")(train_command)``). torch and the engine
are imported inside the function, so importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _check_model_arg(value: str | None, option: str) -> None:
    """A local folder that is missing or holds no model fails here, in one line, instead of as a
    Hub lookup traceback after the data is read. Hub ids (``name`` or ``org/name``) pass."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise typer.BadParameter(f"{value}: folder has no config.json (not a model folder)", param_hint=option)
    elif path.exists():
        raise typer.BadParameter(f"{value}: not a folder (a model folder or a Hugging Face id)", param_hint=option)
    elif path.is_absolute() or value.startswith((".", "~")) or value.count("/") > 1:
        raise typer.BadParameter(f"{value}: no such model folder", param_hint=option)


def _multiple_of_16(value: int) -> int:
    """The trainer's own rule for --pack-bucket, checked before the model loads."""
    if value % 16:
        raise typer.BadParameter(f"must be 0 or a multiple of 16, not {value}")
    return value


def train_command(
    events: Path = typer.Option(..., "--events", exists=True, dir_okay=False, help="JSONL rows {prompt, completion, label}"),
    model: str = typer.Option(..., "--model", help="Hugging Face model id or local folder (the starting policy = π_ref)"),
    out: Path = typer.Option(..., "--out", file_okay=False, help="output folder: checkpoints/, final/ (and adapter/ with --lora)"),
    reference: Optional[str] = typer.Option(None, help="π_ref id or folder (default: the starting model)"),
    beta: float = typer.Option(0.1, help="KTO β"),
    lambda_d: Optional[float] = typer.Option(None, "--lambda-d", help="λD (default: from the balancer)"),
    lambda_u: Optional[float] = typer.Option(None, "--lambda-u", help="λU (default: from the balancer)"),
    target_ratio: float = typer.Option(1.0, min=1.0, max=1.5, help="balancer target λD·nD/(λU·nU), in [1, 1.5]"),
    min_per_class: int = typer.Option(1, min=1, help="refuse to train below this many events per class"),
    learning_rate: float = typer.Option(5e-6, "--lr", help="AdamW learning rate"),
    epochs: int = typer.Option(1, min=1, help="passes over the data"),
    max_steps: Optional[int] = typer.Option(None, min=1, help="stop after this many optimizer steps"),
    microbatch_size: int = typer.Option(8, min=1, help="examples per microbatch (per process); KL pairs live inside it"),
    grad_accum: int = typer.Option(1, min=1, help="gradient accumulation steps"),
    max_length: int = typer.Option(1024, min=1, help="max prompt+completion tokens"),
    warmup_ratio: float = typer.Option(0.1, min=0.0, max=1.0, help="fraction of steps with linear warmup"),
    lora: bool = typer.Option(False, help="train a LoRA adapter (π_ref = adapter disabled); writes a merged copy"),
    lora_r: int = typer.Option(16, min=1, help="LoRA rank"),
    gradient_checkpointing: bool = typer.Option(False, help="trade compute for memory"),
    cuda_graphs: Optional[bool] = typer.Option(
        None, "--cuda-graphs/--no-cuda-graphs", show_default="auto",
        help="replay each step as one CUDA graph where batch shapes repeat (GPU, one process, no --grad-accum; "
             "auto: full fine-tunes, on shapes that make half the steps; docs/benchmarks.md)"),
    pack_bucket: int = typer.Option(0, min=0, callback=_multiple_of_16, help="pad packed batches to multiples of this many tokens, so that "
                                    "variable-length data repeats a few shapes for --cuda-graphs (e.g. 1024; 0: off)"),
    lm_head_grad_cache_gib: Optional[float] = typer.Option(
        None, min=0, max=1024, show_default="4",
        help="GiB of logits gradient the LM head may hold: kept from forward to backward instead of recomputing "
             "the logits where it fits, else recomputed in groups of that size (0: when memory is tight)"),
    no_reference_point: bool = typer.Option(False, help="z0 = 0 (the paper's ablation)"),
    save_every: Optional[int] = typer.Option(None, min=1, help="checkpoint every N steps"),
    seed: int = typer.Option(0, help="seed"),
    resume: bool = typer.Option(True, help="resume from the newest checkpoint under --out"),
) -> None:
    """Fine-tune MODEL with KTO on thumbs-up/down EVENTS and write a checkpoint folder to OUT."""
    from tqdm.auto import tqdm

    from service.balance import compute_weights
    from worker.kto.data import read_jsonl
    from worker.kto.lm_head import DEFAULT_GRAD_CACHE_GIB
    from worker.kto.trainer import KTOTrainConfig, LoraSettings, train_kto

    _check_model_arg(model, "'--model'")
    _check_model_arg(reference, "'--reference'")
    try:
        examples = read_jsonl(events)
    except UnicodeDecodeError as exc:
        raise typer.BadParameter(f"{events}: not UTF-8 ({exc.reason})", param_hint="'--events'") from None
    except ValueError as exc:  # read_jsonl names the file and line
        raise typer.BadParameter(str(exc), param_hint="'--events'") from None
    nd = sum(e.desirable for e in examples)
    nu = len(examples) - nd
    bal = compute_weights(nd, nu, target_ratio=target_ratio, min_per_class=min_per_class)
    if not bal.allowed:
        typer.echo(f"refusing to train: {bal.reason}", err=True)
        raise typer.Exit(code=2)
    ld = lambda_d if lambda_d is not None else bal.lambda_d
    lu = lambda_u if lambda_u is not None else bal.lambda_u
    typer.echo(f"{len(examples)} events: {nd} desirable, {nu} undesirable -> λD={ld:.3g}, λU={lu:.3g}")

    cfg = KTOTrainConfig(
        beta=beta, lambda_d=ld, lambda_u=lu, use_reference_point=not no_reference_point,
        learning_rate=learning_rate, num_epochs=epochs, max_steps=max_steps, microbatch_size=microbatch_size,
        grad_accum_steps=grad_accum, max_length=max_length, warmup_ratio=warmup_ratio, seed=seed,
        lora=LoraSettings(r=lora_r, alpha=2 * lora_r) if lora else None,
        gradient_checkpointing=gradient_checkpointing, save_every_steps=save_every,
        cuda_graphs="auto" if cuda_graphs is None else cuda_graphs,
        pack_bucket=pack_bucket,
        lm_head_grad_cache_gib=DEFAULT_GRAD_CACHE_GIB if lm_head_grad_cache_gib is None else lm_head_grad_cache_gib,
    )
    bar = None

    def on_step(m: dict) -> None:
        nonlocal bar
        if bar is None:
            # a resumed run's first step is not step 1
            bar = tqdm(total=m["total_steps"], initial=m["step"] - 1, desc="KTO", unit="step")
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", kl=f"{m['kl']:.3f}",
                        margin=f"{m.get('rewards/margins', float('nan')):.3f}")

    try:
        res = train_kto(cfg, model, examples, out, reference=reference, callback=on_step, resume=resume,
                        extra_manifest={"events_file": str(events), "balance": {
                            "n_desirable": nd, "n_undesirable": nu, "target_ratio": target_ratio,
                            "lambda_d": ld, "lambda_u": lu}})
    finally:
        if bar is not None:
            bar.close()
    typer.echo(f"{res.status} after {res.step} steps; model: {res.final_dir}"
               + (f"; adapter: {res.adapter_dir}" if res.adapter_dir else ""))
