"""λD/λU from the class counts: the balancer.

KTO weighs desirable and undesirable examples separately; thumbs data is rarely 1:1, and
training on it with λD = λU lets the majority class dominate (on 1:2 thumbs data that collapsed
a model's task accuracy here). The paper keeps λD·nD / (λU·nU) within [1, 3/2]; this module
applies that rule and nothing else, so it can be tested exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The paper's band for λD·nD / (λU·nU). TRL warns outside [1, 4/3].
BAND_LOW = 1.0
BAND_HIGH = 1.5


@dataclass(frozen=True)
class BalanceResult:
    n_desirable: int
    n_undesirable: int
    target_ratio: float
    lambda_d: float
    lambda_u: float
    #: nD / nU, or None when nU is 0.
    natural_ratio: float | None
    #: λD·nD / (λU·nU) with the chosen weights, or None when a class is empty.
    achieved_ratio: float | None
    allowed: bool
    reason: str | None


def compute_weights(
    n_desirable: int,
    n_undesirable: int,
    target_ratio: float = 1.0,
    min_per_class: int = 1,
) -> BalanceResult:
    """Choose λD, λU for the given counts.

    When nD/nU already lies in the band both weights stay 1; otherwise the larger class keeps
    weight 1 and the smaller one is raised until λD·nD / (λU·nU) equals ``target_ratio``.
    Training is refused, with a reason, when a class is below ``min_per_class``.
    """
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError("counts must be non-negative")
    if not BAND_LOW <= target_ratio <= BAND_HIGH:
        raise ValueError(f"target_ratio must lie in [{BAND_LOW}, {BAND_HIGH}], got {target_ratio}")
    if min_per_class < 1:
        raise ValueError("min_per_class must be at least 1")

    natural = n_desirable / n_undesirable if n_undesirable else None
    reasons = []
    if n_desirable < min_per_class:
        reasons.append(f"desirable events: {n_desirable} < minimum {min_per_class}")
    if n_undesirable < min_per_class:
        reasons.append(f"undesirable events: {n_undesirable} < minimum {min_per_class}")
    if n_desirable == 0 or n_undesirable == 0:
        return BalanceResult(
            n_desirable, n_undesirable, target_ratio, 1.0, 1.0, natural, None, False,
            "; ".join(reasons),
        )

    assert natural is not None
    if BAND_LOW <= natural <= BAND_HIGH:
        lambda_d = lambda_u = 1.0
    elif natural < BAND_LOW:
        # Fewer desirable events: raise λD.
        lambda_d, lambda_u = target_ratio * n_undesirable / n_desirable, 1.0
    else:
        # Desirable events dominate: raise λU.
        lambda_d, lambda_u = 1.0, n_desirable / (target_ratio * n_undesirable)
    achieved = lambda_d * n_desirable / (lambda_u * n_undesirable)
    return BalanceResult(
        n_desirable, n_undesirable, target_ratio, lambda_d, lambda_u, natural, achieved,
        not reasons, "; ".join(reasons) or None,
    )
