"""The evaluation gate's rules: a pure function from measurements to pass/reject.

The measurements come from ``worker.kto.evaluate.evaluate_policy`` on held-out events (run by
``worker/gate.py``); the thresholds from settings (PROSPECT_GATE_*). Kept apart from the
worker so the rules can be read, tested and explained without a model.

A check that is configured but cannot be measured (no held-out undesirable events, so no
margin; no generations, so no length or KL) fails: "The loop must not make things worse"
(ARCHITECTURE.md) means nothing reaches production on faith.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from service.settings import Settings


@dataclass(frozen=True)
class Thresholds:
    min_holdout_examples: int = 20
    #: None disables a check.
    min_margin: float | None = 0.0
    max_kl: float | None = 10.0
    max_length_drift: float | None = 0.5
    task_tolerance: float | None = 0.0
    task_evaluator: str | None = None
    task_metric: str = "score"

    @classmethod
    def from_settings(cls, s: Settings) -> Thresholds:
        return cls(min_holdout_examples=s.gate_min_holdout_examples, min_margin=s.gate_min_margin,
                   max_kl=s.gate_max_kl, max_length_drift=s.gate_max_length_drift,
                   task_tolerance=s.gate_task_tolerance, task_evaluator=s.gate_task_evaluator,
                   task_metric=s.gate_task_metric)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: Any
    threshold: Any
    message: str


@dataclass
class GateDecision:
    passed: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        failed = [c.message for c in self.checks if not c.passed]
        return "; ".join(failed) if failed else None

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason,
                "checks": [asdict(c) for c in self.checks]}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def task_score(value: Any, metric: str) -> float | None:
    """A task evaluator's result as one number: a float, or ``value[metric]``."""
    if isinstance(value, dict):
        value = value.get(metric)
    return float(value) if _finite(value) else None


def check_integrity(ok: bool, message: str) -> Check:
    return Check("integrity", ok, ok, True, message if not ok else "files match the manifest")


def check_holdout(n: int, t: Thresholds) -> Check:
    ok = n >= t.min_holdout_examples
    return Check("holdout_size", ok, n, t.min_holdout_examples,
                 f"{n} held-out events" + ("" if ok else f"; at least {t.min_holdout_examples} "
                                           "needed (PROSPECT_GATE_MIN_HOLDOUT_EXAMPLES)"))


def decide(report: dict[str, Any] | None, t: Thresholds, pre: list[Check] | None = None
           ) -> GateDecision:
    """Apply every configured threshold to an EvalReport (as a dict). ``pre``: checks made
    before evaluating (integrity, held-out size); when one failed, ``report`` may be None."""
    checks = list(pre or [])
    if report is None:
        return GateDecision(all(c.passed for c in checks) and bool(checks), checks)
    if t.min_margin is not None:
        m = report.get("margin")
        ok = _finite(m) and m >= t.min_margin
        checks.append(Check("margin", ok, m, t.min_margin,
                            f"held-out reward margin {m:.4g} (minimum {t.min_margin})"
                            if _finite(m) else "held-out reward margin not measurable (the "
                            "held-out events need both thumbs-up and thumbs-down)"))
    if t.max_kl is not None:
        kl = report.get("kl_sampled")
        ok = _finite(kl) and kl <= t.max_kl
        checks.append(Check("kl", ok, kl, t.max_kl,
                            f"KL to π_ref {kl:.4g} nats per sequence (maximum {t.max_kl})"
                            if _finite(kl) else "KL to π_ref not measurable (no generations)"))
    if t.max_length_drift is not None:
        lp, lr = report.get("gen_len_policy"), report.get("gen_len_reference")
        if _finite(lp) and _finite(lr):
            drift = abs(lp / lr - 1.0) if lr > 0 else (0.0 if lp == 0 else math.inf)
            ok = drift <= t.max_length_drift
            checks.append(Check("length_drift", ok, drift, t.max_length_drift,
                                f"generation length {lp:.3g} vs π_ref {lr:.3g} tokens: drift "
                                f"{drift:.3g} (maximum {t.max_length_drift})"))
        else:
            checks.append(Check("length_drift", False, None, t.max_length_drift,
                                "generation length not measurable (no generations)"))
    if t.task_evaluator and t.task_tolerance is not None:
        tp = task_score(report.get("task_policy"), t.task_metric)
        tr = task_score(report.get("task_reference"), t.task_metric)
        if tp is None or tr is None:
            checks.append(Check("task", False, None, t.task_tolerance,
                                f"task evaluator {t.task_evaluator} gave no score"))
        else:
            ok = tp >= tr - t.task_tolerance
            checks.append(Check("task", ok, {"policy": tp, "reference": tr}, t.task_tolerance,
                                f"task score {tp:.4g} vs π_ref {tr:.4g} (may be at most "
                                f"{t.task_tolerance} lower)"))
    return GateDecision(all(c.passed for c in checks), checks)
