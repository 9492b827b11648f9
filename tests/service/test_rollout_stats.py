"""Rate comparisons and the canary guard.

The simulations peek after every batch, as the service will: that is exactly the use a fixed-
level test cannot survive and the sequential guard must. They are seeded, so the measured rates
quoted in the comments are what these seeds give (1000 experiments each; the binomial standard
deviation of a rate near 0.05 is then about 0.007).
"""

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, strategies as st

from service.rollout_stats import (
    Decision,
    GuardConfig,
    _log_half_mixture,
    evaluate_guard,
    two_proportion_test,
    wilson_interval,
)

# --- Wilson interval ------------------------------------------------------------------------


def test_wilson_known_value():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4)
    assert hi == pytest.approx(0.5962, abs=1e-4)


def test_wilson_at_the_edges():
    # 0/n: the upper bound is z^2 / (n + z^2); the interval does not collapse to a point.
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_wider_with_more_confidence_and_narrower_with_more_data():
    lo95, hi95 = wilson_interval(30, 100)
    lo99, hi99 = wilson_interval(30, 100, confidence=0.99)
    assert lo99 < lo95 < 0.3 < hi95 < hi99
    lo_big, hi_big = wilson_interval(3000, 10000)
    assert hi_big - lo_big < hi95 - lo95


@pytest.mark.parametrize("s,n", [(-1, 10), (11, 10), (0, -1)])
def test_wilson_rejects_bad_counts(s, n):
    with pytest.raises(ValueError):
        wilson_interval(s, n)


@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.5, 1.5, math.nan])
def test_wilson_rejects_bad_confidence(confidence):
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(5, 10, confidence)


# --- two-proportion z-test ------------------------------------------------------------------


def test_two_proportion_known_value():
    # Pooled rate 0.55; se = sqrt(0.55 * 0.45 * (1/100 + 1/100)) = 0.070356; z = 0.1 / se.
    r = two_proportion_test(60, 100, 50, 100)
    assert (r.rate1, r.rate2) == (0.6, 0.5)
    assert r.diff == pytest.approx(0.1)
    assert r.z == pytest.approx(1.42134, abs=1e-5)
    assert r.p_value == pytest.approx(0.155218, abs=1e-6)


def test_two_proportion_is_antisymmetric():
    a = two_proportion_test(30, 120, 45, 110)
    b = two_proportion_test(45, 110, 30, 120)
    assert a.z == pytest.approx(-b.z)
    assert a.p_value == pytest.approx(b.p_value)
    assert a.diff == pytest.approx(-b.diff)


@pytest.mark.parametrize(
    "s1,n1,s2,n2",
    [(0, 0, 0, 0), (0, 0, 5, 10), (5, 10, 0, 0), (10, 10, 7, 7), (0, 10, 0, 30)],
)
def test_two_proportion_degenerate(s1, n1, s2, n2):
    r = two_proportion_test(s1, n1, s2, n2)
    assert (r.z, r.p_value) == (0.0, 1.0)
    assert not any(math.isnan(x) for x in (r.rate1, r.rate2, r.diff))


def test_two_proportion_rejects_bad_counts():
    with pytest.raises(ValueError):
        two_proportion_test(11, 10, 5, 10)


# --- GuardConfig ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field_name",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"noninferiority_margin": -0.01}, "noninferiority_margin"),
        ({"noninferiority_margin": 1.0}, "noninferiority_margin"),
        ({"min_samples": 0}, "min_samples"),
        ({"min_samples": 10.5}, "min_samples"),
        ({"min_samples": True}, "min_samples"),
        ({"max_samples": 100}, "max_samples"),  # below the default min_samples of 200
        ({"max_samples": 500.0}, "max_samples"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -0.1}, "tau"),
        ({"tau": math.inf}, "tau"),
        ({"tau": math.nan}, "tau"),
    ],
)
def test_config_validation_names_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        GuardConfig(**kwargs)


def test_config_defaults_and_frozen():
    cfg = GuardConfig()
    assert (cfg.alpha, cfg.noninferiority_margin, cfg.min_samples, cfg.max_samples, cfg.tau) == (
        0.05, 0.02, 200, None, 0.1,
    )
    with pytest.raises(AttributeError):
        cfg.alpha = 0.1  # type: ignore[misc]


# --- the mixture and single evaluations -----------------------------------------------------


@pytest.mark.parametrize(
    "diff,var,theta0,tau,side",
    [(-0.03, 1e-4, 0.0, 0.1, -1), (0.01, 2e-4, -0.02, 0.1, 1), (0.02, 1e-4, 0.0, 0.05, -1)],
)
def test_half_mixture_matches_numerical_integral(diff, var, theta0, tau, side):
    # Lambda = integral over the alternative half-line of LR(theta) * 2 N(theta; theta0, tau^2).
    theta = theta0 + side * np.linspace(0.0, 1.0, 2_000_001)
    log_lr = ((diff - theta0) ** 2 - (diff - theta) ** 2) / (2 * var)
    prior = 2 * np.exp(-((theta - theta0) ** 2) / (2 * tau**2)) / (tau * math.sqrt(2 * math.pi))
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    integral = trapezoid(np.exp(log_lr) * prior, dx=1.0 / 2_000_000)
    assert math.exp(_log_half_mixture(diff, var, theta0, tau, side)) == pytest.approx(
        integral, rel=1e-6
    )


def test_waits_for_min_samples_even_when_the_gap_is_huge():
    r = evaluate_guard(0, 150, 150, 150, GuardConfig(min_samples=200))
    assert r.decision is Decision.CONTINUE
    assert r.p_value_harm < 1e-6  # the evidence is there; the rule still waits
    assert "waiting for 200 events per arm" in r.reason


def test_clear_harm_rolls_back():
    r = evaluate_guard(400, 1000, 600, 1000, GuardConfig())
    assert r.decision is Decision.ROLLBACK
    assert r.p_value_harm <= 0.05
    assert r.canary_rate == 0.4 and r.prod_rate == 0.6
    assert r.diff == pytest.approx(-0.2)
    assert "worse" in r.reason and "0.400" in r.reason


def test_equal_rates_with_much_data_promote():
    r = evaluate_guard(30_000, 50_000, 30_000, 50_000, GuardConfig())
    assert r.decision is Decision.PROMOTE
    assert r.p_value_noninferiority <= 0.05
    assert r.p_value_harm == 1.0


def test_small_harm_within_margin_is_still_rolled_back():
    # 1 point worse, within the 2-point margin, but detectably worse: harm is asked first.
    r = evaluate_guard(590_000, 1_000_000, 600_000, 1_000_000, GuardConfig())
    assert r.p_value_noninferiority <= 0.05 and r.p_value_harm <= 0.05
    assert r.decision is Decision.ROLLBACK


def test_cap_makes_undecided_canary_inconclusive():
    cfg = GuardConfig(max_samples=1000)
    assert evaluate_guard(590, 1000, 600, 1000, cfg).decision is Decision.INCONCLUSIVE
    # Only once both arms reach the cap.
    assert evaluate_guard(590, 1000, 5900, 9999, cfg).decision is Decision.INCONCLUSIVE
    assert evaluate_guard(590, 999, 6000, 10000, cfg).decision is Decision.CONTINUE


def test_result_is_a_pure_function_of_counts():
    cfg = GuardConfig()
    assert evaluate_guard(300, 500, 320, 500, cfg) == evaluate_guard(300, 500, 320, 500, cfg)


def test_intervals_are_wilson():
    r = evaluate_guard(50, 100, 60, 100, GuardConfig())
    assert r.canary_interval == wilson_interval(50, 100)
    assert r.prod_interval == wilson_interval(60, 100)


def test_more_harm_means_smaller_harm_p_value():
    cfg = GuardConfig()
    ps = [evaluate_guard(up, 2000, 1200, 2000, cfg).p_value_harm for up in range(1200, 1000, -20)]
    assert ps == sorted(ps, reverse=True)
    assert ps[0] == 1.0 and ps[-1] < 0.05


@pytest.mark.parametrize("args", [(-1, 10, 5, 10), (11, 10, 5, 10), (5, 10, 5, -1)])
def test_guard_rejects_bad_counts(args):
    with pytest.raises(ValueError):
        evaluate_guard(*args, GuardConfig())


@given(
    st.integers(0, 10**7).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
    st.integers(0, 10**7).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
    st.floats(1e-4, 10.0),
)
def test_guard_never_nan_or_out_of_range(canary, prod, tau):
    r = evaluate_guard(*canary, *prod, GuardConfig(min_samples=1, tau=tau))
    for p in (r.p_value_harm, r.p_value_noninferiority):
        assert 0.0 <= p <= 1.0
    for x in (r.canary_rate, r.prod_rate, r.diff, *r.canary_interval, *r.prod_interval):
        assert math.isfinite(x)
    assert r.decision in set(Decision)


# --- simulations: peeking after every batch -------------------------------------------------

N_EXPERIMENTS = 1000
ALPHA = 0.05
#: alpha plus about two binomial standard deviations at 1000 experiments.
ALPHA_SLACK = 0.065


@dataclass
class Simulated:
    #: The first decision other than CONTINUE in each experiment (CONTINUE if none).
    first: list[Decision] = field(default_factory=list)
    #: Every decision each experiment showed at any look, including looks after the first
    #: decision: "ever" is the stricter count for error rates.
    seen: list[set[Decision]] = field(default_factory=list)
    #: Experiments in which a one-sided z-test at ALPHA said "canary worse" at any look...
    naive_ever: int = 0
    #: ...and at the last look alone.
    naive_last: int = 0

    def first_rate(self, d: Decision) -> float:
        return sum(x is d for x in self.first) / len(self.first)

    def ever_rate(self, d: Decision) -> float:
        return sum(d in s for s in self.seen) / len(self.seen)


def simulate(
    canary_rate: float,
    prod_rate: float,
    *,
    batch_canary: int,
    batch_prod: int,
    batches: int,
    config: GuardConfig,
    seed: int,
) -> Simulated:
    rng = np.random.default_rng(seed)
    canary_up = rng.binomial(batch_canary, canary_rate, (N_EXPERIMENTS, batches)).cumsum(axis=1)
    prod_up = rng.binomial(batch_prod, prod_rate, (N_EXPERIMENTS, batches)).cumsum(axis=1)
    z_crit = -1.6448536269514722  # one-sided 5 %
    out = Simulated()
    for e in range(N_EXPERIMENTS):
        first, seen, naive, naive_says_worse = Decision.CONTINUE, set(), False, False
        for b in range(batches):
            counts = (int(canary_up[e, b]), batch_canary * (b + 1),
                      int(prod_up[e, b]), batch_prod * (b + 1))
            decision = evaluate_guard(*counts, config).decision
            seen.add(decision)
            if first is Decision.CONTINUE:
                first = decision
            if counts[1] >= config.min_samples:
                naive_says_worse = two_proportion_test(*counts).z <= z_crit
                naive = naive or naive_says_worse
        out.first.append(first)
        out.seen.append(seen)
        out.naive_ever += naive
        out.naive_last += naive_says_worse
    return out


@pytest.fixture(scope="module")
def null_equal() -> Simulated:
    """0.60 vs 0.60, 50 events per arm per batch, 80 looks, up to 4000 per arm."""
    return simulate(0.6, 0.6, batch_canary=50, batch_prod=50, batches=80,
                    config=GuardConfig(alpha=ALPHA, max_samples=4000), seed=20240601)


def test_no_false_rollback_when_rates_are_equal(null_equal):
    # Measured: 0.028 ever-rollback (first decisions: promote 0.249, inconclusive 0.723).
    assert null_equal.ever_rate(Decision.ROLLBACK) <= ALPHA_SLACK


def test_naive_peeking_z_test_rolls_back_far_too_often(null_equal):
    # The same data, a one-sided z-test at 5 %: fine at one look (measured 0.044), but peeked
    # at all 77 looks it cries "worse" in 0.270 of experiments. This is why the guard exists.
    assert null_equal.naive_last / N_EXPERIMENTS <= ALPHA_SLACK + 0.01
    assert null_equal.naive_ever / N_EXPERIMENTS >= 0.15
    assert null_equal.naive_ever / N_EXPERIMENTS > 3 * null_equal.ever_rate(Decision.ROLLBACK)


def test_no_false_rollback_with_unequal_traffic():
    # A 20 % canary: production gets four times the events. Measured: 0.016 ever-rollback
    # (the peeked z-test: 0.283).
    sim = simulate(0.6, 0.6, batch_canary=50, batch_prod=200, batches=80,
                   config=GuardConfig(alpha=ALPHA, max_samples=4000), seed=7)
    assert sim.ever_rate(Decision.ROLLBACK) <= ALPHA_SLACK


def test_worse_canary_is_rolled_back():
    # 0.55 vs 0.60. Measured: first decision rollback 0.962; promote ever 0.002.
    sim = simulate(0.55, 0.60, batch_canary=50, batch_prod=50, batches=80,
                   config=GuardConfig(alpha=ALPHA, max_samples=4000), seed=11)
    assert sim.first_rate(Decision.ROLLBACK) >= 0.8
    assert sim.ever_rate(Decision.PROMOTE) <= 0.02


def test_equal_canary_is_promoted_by_the_cap():
    # Showing non-inferiority to 2 points takes more data than spotting 5 points of harm:
    # 200 per arm per batch, 100 looks, up to 20000 per arm. Measured: first decision promote
    # 0.833, rollback 0.022, inconclusive 0.145. (Capped at 4000 per arm it is only ~0.25.)
    sim = simulate(0.6, 0.6, batch_canary=200, batch_prod=200, batches=100,
                   config=GuardConfig(alpha=ALPHA, max_samples=20_000), seed=13)
    assert sim.first_rate(Decision.PROMOTE) >= 0.7
    assert sim.first_rate(Decision.ROLLBACK) <= ALPHA_SLACK
    assert sim.first_rate(Decision.CONTINUE) == 0.0  # the cap always ends the experiment


def test_canary_at_the_margin_is_not_promoted():
    # 0.58 vs 0.60: exactly the margin, the hardest case for the non-inferiority side.
    # Measured: promote ever 0.017 (and rollback first 0.866: 2 points of harm show up).
    sim = simulate(0.58, 0.60, batch_canary=200, batch_prod=200, batches=100,
                   config=GuardConfig(alpha=ALPHA, max_samples=20_000), seed=17)
    assert sim.ever_rate(Decision.PROMOTE) <= ALPHA_SLACK
