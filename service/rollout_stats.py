"""Comparing live versions' thumbs-up rates, and the canary guard.

The guard is re-evaluated every time feedback arrives. A fixed-level test peeked at that often
is wrong most of the time: with equal rates, a z-test at alpha = 0.05 checked after every batch
"finds" a difference in a large share of experiments (the tests show it). The guard therefore
uses a sequential test whose error bound holds over *all* looks at once.

Design: a mixture sequential probability ratio test (mSPRT) on the difference of the two rates,
theta = p_canary - p_production (Robbins 1970; Johari, Koomen, Pekelis, Walsh, "Peeking at A/B
tests", KDD 2017; Johari, Pekelis, Walsh, "Always valid inference: continuous monitoring of
A/B tests", Operations Research 70(3), 2022, arXiv:1512.04922).

* Normal approximation: the observed difference d is N(theta, V), with V the plug-in variance
  p_c(1 - p_c)/n_c + p_p(1 - p_p)/n_p (rates smoothed as (up + 1)/(n + 2) so that V > 0).
* For a null boundary theta0, the likelihood ratio of theta against theta0 is mixed over theta
  with a *half*-normal N(theta0, tau^2) restricted to the alternative side, which has the
  closed form  Lambda = 2 * sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta0)^2 / (2 V (V + tau^2)))
  * P(posterior theta on the alternative side). Under the whole one-sided null this is a
  nonnegative supermartingale, so by Ville's inequality P(Lambda ever >= 1/alpha) <= alpha,
  however often it is looked at. 1/Lambda is the always-valid p-value.
* Two one-sided questions, one alpha each:
  harm -- H0 "canary >= production" (theta0 = 0, mixture below): ROLLBACK when p <= alpha;
  non-inferiority -- H0 "canary <= production - margin" (theta0 = -margin, mixture above):
  PROMOTE when p <= alpha. Harm is asked first: a canary that is detectably worse is rolled
  back even when it is within the margin. Neither is asked before each arm has
  ``min_samples`` events (the normal approximation needs them), and an undecided canary is
  INCONCLUSIVE once both arms have ``max_samples``.

It is a pure function of cumulative counts, so the guard can run on a database aggregate.
The p-values returned are those of the current look (1/Lambda now, not the running minimum,
which would need the history); the alpha bound is on "ever decides", so a caller must act on
the first ROLLBACK or PROMOTE rather than wait for it to repeat.
The guarantee is exact for Gaussian data with known variance and a fixed allocation ratio;
with Bernoulli data, a plug-in variance and a drifting ratio it is a close approximation.
``tau`` is the scale of differences the test is tuned to find fastest: near 0.1 suits
differences of several points; a smaller tau finds small differences sooner and big ones later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from statistics import NormalDist

__all__ = [
    "Decision",
    "GuardConfig",
    "GuardResult",
    "TwoPropResult",
    "evaluate_guard",
    "two_proportion_test",
    "wilson_interval",
]

_STD_NORMAL = NormalDist()
_LOG2 = math.log(2.0)


def _check_counts(successes: int, n: int, what: str) -> None:
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"{what}: need 0 <= successes <= n, got {successes}/{n}")


def _rate(successes: int, n: int) -> float:
    return successes / n if n else 0.0


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a rate: unlike rate +- z*se it stays inside [0, 1] and keeps
    its coverage at small n and at rates near 0 or 1. With no data it is (0.0, 1.0)."""
    _check_counts(successes, n, "wilson_interval")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if n == 0:
        return (0.0, 1.0)
    z = _STD_NORMAL.inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    z2n = z * z / n
    center = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    return (max(0.0, center - half), min(1.0, center + half))


@dataclass(frozen=True)
class TwoPropResult:
    rate1: float
    rate2: float
    #: rate1 - rate2
    diff: float
    z: float
    #: Two-sided; 1.0 when the test is undefined (an empty arm, or all outcomes identical).
    p_value: float


def two_proportion_test(s1: int, n1: int, s2: int, n2: int) -> TwoPropResult:
    """Pooled two-proportion z-test, for a one-off comparison (not for repeated looks: that
    is what :func:`evaluate_guard` is for). Degenerate inputs give z = 0, p = 1, never NaN."""
    _check_counts(s1, n1, "arm 1")
    _check_counts(s2, n2, "arm 2")
    rate1, rate2 = _rate(s1, n1), _rate(s2, n2)
    diff = rate1 - rate2
    if n1 == 0 or n2 == 0:
        return TwoPropResult(rate1, rate2, diff, 0.0, 1.0)
    pooled = (s1 + s2) / (n1 + n2)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    if se == 0.0:
        return TwoPropResult(rate1, rate2, diff, 0.0, 1.0)
    z = diff / se
    return TwoPropResult(rate1, rate2, diff, z, math.erfc(abs(z) / math.sqrt(2.0)))


class Decision(StrEnum):
    ROLLBACK = "rollback"
    PROMOTE = "promote"
    CONTINUE = "continue"
    INCONCLUSIVE = "inconclusive"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GuardConfig:
    #: Bound on the chance of ever rolling back a canary that is not worse, and, separately,
    #: of ever promoting one that is worse by the margin or more.
    alpha: float = 0.05
    #: How much worse (absolute thumbs-up rate) a canary may be and still be promoted.
    noninferiority_margin: float = 0.02
    #: Events per arm before any decision: the normal approximation needs them.
    min_samples: int = 200
    #: Events per arm after which an undecided canary is inconclusive; None: no cap.
    max_samples: int | None = None
    #: Standard deviation of the mixing distribution (see the module docstring).
    tau: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not 0.0 <= self.noninferiority_margin < 1.0:
            raise ValueError(
                f"noninferiority_margin must be in [0, 1), got {self.noninferiority_margin!r}"
            )
        if not _is_int(self.min_samples) or self.min_samples < 1:
            raise ValueError(f"min_samples must be an integer >= 1, got {self.min_samples!r}")
        if self.max_samples is not None and (
            not _is_int(self.max_samples) or self.max_samples < self.min_samples
        ):
            raise ValueError(
                f"max_samples must be None or an integer >= min_samples "
                f"({self.min_samples}), got {self.max_samples!r}"
            )
        if not (0.0 < self.tau < math.inf):
            raise ValueError(f"tau must be a positive finite number, got {self.tau!r}")


@dataclass(frozen=True)
class GuardResult:
    decision: Decision
    #: Always-valid p-value for H0 "canary is not worse than production".
    p_value_harm: float
    #: Always-valid p-value for H0 "canary is worse than production by the margin or more".
    p_value_noninferiority: float
    canary_rate: float
    prod_rate: float
    #: canary_rate - prod_rate
    diff: float
    canary_interval: tuple[float, float]
    prod_interval: tuple[float, float]
    reason: str


def _log_norm_cdf(x: float) -> float:
    """log Phi(x) without underflow far in the left tail (Mills-ratio expansion there)."""
    if x > -20.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    x2 = x * x
    return -x2 / 2.0 - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log1p(
        -1.0 / x2 + 3.0 / (x2 * x2)
    )


def _log_half_mixture(diff: float, var: float, theta0: float, tau: float, side: int) -> float:
    """log Lambda: the normal likelihood ratio mixed over theta ~ N(theta0, tau^2) restricted
    to the ``side`` (-1 below, +1 above) of theta0."""
    shrink = tau * tau / (var + tau * tau)
    delta = diff - theta0
    log_full = 0.5 * math.log(var / (var + tau * tau)) + shrink * delta * delta / (2.0 * var)
    # Posterior of theta is N(theta0 + shrink*delta, shrink*var); the half-mixture is twice the
    # full mixture times the posterior mass on the alternative side.
    posterior_z = side * shrink * delta / math.sqrt(shrink * var)
    return _LOG2 + log_full + _log_norm_cdf(posterior_z)


def _p_from_log_lambda(log_lambda: float) -> float:
    return 1.0 if log_lambda <= 0.0 else math.exp(-log_lambda)


def _smoothed_var(up: int, n: int) -> float:
    p = (up + 1.0) / (n + 2.0)
    return p * (1.0 - p) / n


def evaluate_guard(
    canary_up: int, canary_n: int, prod_up: int, prod_n: int, config: GuardConfig
) -> GuardResult:
    """The canary guard's decision for the cumulative counts so far (see the module docstring).

    Call it as often as you like; act on the first decision that is not CONTINUE.
    """
    _check_counts(canary_up, canary_n, "canary")
    _check_counts(prod_up, prod_n, "production")
    c_rate, p_rate = _rate(canary_up, canary_n), _rate(prod_up, prod_n)
    diff = c_rate - p_rate
    if canary_n and prod_n:
        var = _smoothed_var(canary_up, canary_n) + _smoothed_var(prod_up, prod_n)
        margin = config.noninferiority_margin
        p_harm = _p_from_log_lambda(_log_half_mixture(diff, var, 0.0, config.tau, -1))
        p_noninf = _p_from_log_lambda(_log_half_mixture(diff, var, -margin, config.tau, +1))
    else:
        p_harm = p_noninf = 1.0

    decision, reason = _decide(canary_n, prod_n, p_harm, p_noninf, config)
    summary = (
        f"canary {c_rate:.3f} ({canary_up}/{canary_n}) vs production {p_rate:.3f} "
        f"({prod_up}/{prod_n}), diff {diff:+.3f}"
    )
    return GuardResult(
        decision=decision,
        p_value_harm=p_harm,
        p_value_noninferiority=p_noninf,
        canary_rate=c_rate,
        prod_rate=p_rate,
        diff=diff,
        canary_interval=wilson_interval(canary_up, canary_n),
        prod_interval=wilson_interval(prod_up, prod_n),
        reason=f"{reason}; {summary}",
    )


def _decide(
    canary_n: int, prod_n: int, p_harm: float, p_noninf: float, config: GuardConfig
) -> tuple[Decision, str]:
    alpha, margin = config.alpha, config.noninferiority_margin
    fewest = min(canary_n, prod_n)
    if fewest < config.min_samples:
        return Decision.CONTINUE, (
            f"waiting for {config.min_samples} events per arm (have {canary_n} canary, "
            f"{prod_n} production)"
        )
    if p_harm <= alpha:
        return Decision.ROLLBACK, (
            f"canary is worse than production (always-valid p = {p_harm:.4g} <= {alpha})"
        )
    if p_noninf <= alpha:
        return Decision.PROMOTE, (
            f"canary is within {margin:.3f} of production or better "
            f"(always-valid p = {p_noninf:.4g} <= {alpha})"
        )
    if config.max_samples is not None and fewest >= config.max_samples:
        return Decision.INCONCLUSIVE, (
            f"no decision after {config.max_samples} events per arm "
            f"(p harm = {p_harm:.4g}, p non-inferiority = {p_noninf:.4g})"
        )
    return Decision.CONTINUE, (
        f"not enough evidence yet (p harm = {p_harm:.4g}, p non-inferiority = {p_noninf:.4g})"
    )
