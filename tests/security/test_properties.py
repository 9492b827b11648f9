"""Property tests (hypothesis) for the two pure functions the loop's safety rests on: the
balancer's λD/λU and the canary bucketing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from service.balance import BAND_HIGH, BAND_LOW, compute_weights
from service.canary import bucket, choose_version, in_canary

counts = st.integers(0, 10**9)
targets = st.floats(BAND_LOW, BAND_HIGH)
minimums = st.integers(1, 10**4)


@given(nd=counts, nu=counts, t=targets, m=minimums)
def test_balancer_ratio_in_band_larger_class_unit_or_refusal(nd, nu, t, m):
    r = compute_weights(nd, nu, target_ratio=t, min_per_class=m)
    if nd < m or nu < m:
        # Refused, saying which class is short.
        assert not r.allowed and r.reason
        if nd < m:
            assert f"desirable events: {nd} < minimum {m}" in r.reason
        if nu < m:
            assert f"undesirable events: {nu} < minimum {m}" in r.reason
        return
    assert r.allowed and r.reason is None
    assert BAND_LOW - 1e-9 <= r.achieved_ratio <= BAND_HIGH + 1e-9
    assert r.lambda_d >= 1.0 and r.lambda_u >= 1.0
    # the larger class keeps weight 1 (on a tie, both do)
    if nd >= nu:
        assert r.lambda_d == 1.0
    if nu >= nd:
        assert r.lambda_u == 1.0
    assert math.isclose(r.achieved_ratio, r.lambda_d * nd / (r.lambda_u * nu), rel_tol=1e-12)
    if not BAND_LOW <= nd / nu <= BAND_HIGH:
        assert math.isclose(r.achieved_ratio, t, rel_tol=1e-9)


@given(nd=st.integers(1, 10**6), nu=st.integers(1, 10**6), k=st.integers(2, 1000), t=targets)
def test_balancer_depends_on_the_ratio_only(nd, nu, k, t):
    """Scaling both classes changes no weight: more data of the same mix, same λ."""
    a, b = compute_weights(nd, nu, t), compute_weights(k * nd, k * nu, t)
    assert math.isclose(a.lambda_d, b.lambda_d, rel_tol=1e-9)
    assert math.isclose(a.lambda_u, b.lambda_u, rel_tol=1e-9)


@given(nd=counts, nu=counts, t=st.one_of(st.floats(max_value=BAND_LOW, exclude_max=True),
                                         st.floats(min_value=BAND_HIGH, exclude_min=True),
                                         st.just(math.nan)))
def test_balancer_refuses_targets_outside_the_band(nd, nu, t):
    with pytest.raises(ValueError):
        compute_weights(nd, nu, target_ratio=t)


users = st.text(min_size=1, max_size=40)
salts = st.text(max_size=40)
percents = st.floats(0, 100)


@given(users, salts)
def test_canary_bucket_is_stable_and_in_range(user, salt):
    b = bucket(user, salt)
    assert 0.0 <= b < 1.0
    assert bucket(user, salt) == b  # no state: every API process and request agrees


@given(users, salts, percents, percents)
def test_canary_is_monotone_in_percent(user, salt, p1, p2):
    """Raising the percentage only adds users: nobody flips back to production."""
    low, high = sorted((p1, p2))
    if choose_version(user, "prod", "canary", low, salt) == "canary":
        assert choose_version(user, "prod", "canary", high, salt) == "canary"
    assert in_canary(user, salt, low) <= in_canary(user, salt, high)


@given(st.sampled_from([None, ""]), salts, percents)
def test_anonymous_users_get_production(user, salt, percent):
    assert choose_version(user, "prod", "canary", percent, salt) == "prod"


@given(users, salts, percents)
def test_choose_version_answers_one_of_the_arms(user, salt, percent):
    got = choose_version(user, "prod", "canary", percent, salt)
    assert got == ("canary" if bucket(user, salt) < percent / 100 else "prod")
    assert choose_version(user, "prod", None, percent, salt) == "prod"
    assert choose_version(user, "prod", "canary", 0.0, salt) == "prod"
    assert choose_version(user, "prod", "canary", 100.0, salt) == "canary"


@given(users, salts, st.one_of(st.floats(max_value=0, exclude_max=True),
                               st.floats(min_value=100, exclude_min=True), st.just(math.nan)))
def test_invalid_percentages_are_refused(user, salt, percent):
    with pytest.raises(ValueError):
        choose_version(user, "prod", "canary", percent, salt)


@settings(max_examples=20)
@given(st.lists(users, min_size=200, max_size=200, unique=True), salts)
def test_the_canary_share_follows_the_percentage(population, salt):
    """Over many users the canary's share is close to the percentage (a loose binomial band:
    bucketing must not be biased by the salt)."""
    share = sum(in_canary(u, salt, 50.0) for u in population) / len(population)
    assert 0.3 <= share <= 0.7
