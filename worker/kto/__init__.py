"""Prospect's KTO training engine: a plain library on torch + transformers (+ accelerate,
peft, safetensors). It imports nothing from ``service``, Celery, SQL or HTTP.

Public API (see each module's docstring):

* :func:`train_kto`, :class:`KTOTrainConfig`, :class:`LoraSettings`, :class:`TrainResult`,
  :func:`latest_checkpoint`, :func:`verify_manifest` — ``worker.kto.trainer``
* :func:`kto_loss` — ``worker.kto.loss``
* :class:`FeedbackExample`, :func:`read_jsonl`, :func:`tokenize_examples`, :func:`make_plan` —
  ``worker.kto.data``
* :func:`sequence_logps` — ``worker.kto.logprobs``
* :func:`pack_examples`, :func:`packed_sequence_logps`, :func:`packed_attention` — ``worker.kto.packing``
  (padding-free microbatches, issue 4)
* :func:`load_reference`, :func:`reference_id`, :func:`precompute_reference_logps` —
  ``worker.kto.reference``
* :func:`evaluate_policy`, :class:`EvalReport`, :func:`load_callable` — ``worker.kto.evaluate``
* ``worker.kto.toy`` — toy tokenizer/model/task for tests and the demo
"""

from .data import FeedbackExample, make_plan, read_jsonl, tokenize_examples
from .evaluate import EvalReport, evaluate_policy, load_callable
from .logprobs import sequence_logps
from .packing import pack_examples, packed_attention, packed_sequence_logps
from .loss import kto_loss
from .reference import load_reference, precompute_reference_logps, reference_id
from .trainer import KTOTrainConfig, LoraSettings, TrainResult, latest_checkpoint, train_kto, verify_manifest

__all__ = [
    "EvalReport", "FeedbackExample", "KTOTrainConfig", "LoraSettings", "TrainResult", "evaluate_policy",
    "kto_loss", "latest_checkpoint", "load_callable", "load_reference", "make_plan", "pack_examples", "packed_attention",
    "packed_sequence_logps", "precompute_reference_logps",
    "read_jsonl", "reference_id", "sequence_logps", "tokenize_examples", "train_kto", "verify_manifest",
]
