import math

import pytest
from hypothesis import given, strategies as st

from service.balance import BAND_HIGH, BAND_LOW, compute_weights


def test_in_band_keeps_unit_weights():
    r = compute_weights(120, 100)
    assert (r.lambda_d, r.lambda_u) == (1.0, 1.0)
    assert r.allowed and r.reason is None
    assert r.achieved_ratio == pytest.approx(1.2)


def test_minority_desirable_is_raised_to_target():
    r = compute_weights(100, 400, target_ratio=1.0)
    assert r.lambda_u == 1.0
    assert r.lambda_d == pytest.approx(4.0)
    assert r.achieved_ratio == pytest.approx(1.0)


def test_majority_desirable_raises_undesirable_weight():
    r = compute_weights(300, 100, target_ratio=1.5)
    assert r.lambda_d == 1.0
    assert r.lambda_u == pytest.approx(2.0)
    assert r.achieved_ratio == pytest.approx(1.5)


@pytest.mark.parametrize("nd,nu", [(0, 10), (10, 0), (0, 0)])
def test_empty_class_refuses(nd, nu):
    r = compute_weights(nd, nu)
    assert not r.allowed
    assert "events: 0 < minimum" in r.reason


def test_below_minimum_refuses_but_reports_weights():
    r = compute_weights(5, 50, min_per_class=10)
    assert not r.allowed
    assert "desirable events: 5 < minimum 10" in r.reason
    assert r.lambda_d == pytest.approx(10.0)


@pytest.mark.parametrize("t", [0.9, 1.6, math.nan])
def test_target_outside_band_is_rejected(t):
    with pytest.raises(ValueError):
        compute_weights(1, 1, target_ratio=t)


@given(
    nd=st.integers(1, 10**7),
    nu=st.integers(1, 10**7),
    t=st.floats(BAND_LOW, BAND_HIGH),
)
def test_property_achieved_ratio_in_band_and_larger_class_unit(nd, nu, t):
    r = compute_weights(nd, nu, target_ratio=t)
    assert r.allowed
    assert BAND_LOW - 1e-9 <= r.achieved_ratio <= BAND_HIGH + 1e-9
    assert min(r.lambda_d, r.lambda_u) == 1.0
    assert r.lambda_d >= 1.0 and r.lambda_u >= 1.0
    if BAND_LOW <= nd / nu <= BAND_HIGH:
        assert (r.lambda_d, r.lambda_u) == (1.0, 1.0)
    else:
        assert r.achieved_ratio == pytest.approx(t, rel=1e-9)
