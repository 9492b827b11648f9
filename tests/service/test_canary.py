"""Canary bucketing: stable, uniform, monotone in the percentage, independent across salts."""

import hashlib
import math

import pytest
from hypothesis import given, strategies as st

import service.canary as canary_mod
from service.canary import bucket, choose_version, in_canary

N_USERS = 100_000
SALT_A = "ckpt-0001"
SALT_B = "ckpt-0002"


@pytest.fixture(scope="module")
def users() -> list[str]:
    return [f"user-{i}" for i in range(N_USERS)]


@pytest.fixture(scope="module")
def buckets_a(users: list[str]) -> list[float]:
    return [bucket(u, SALT_A) for u in users]


@pytest.fixture(scope="module")
def buckets_b(users: list[str]) -> list[float]:
    return [bucket(u, SALT_B) for u in users]


def _binomial_slack(p: float, n: int, sds: float = 4.5) -> float:
    return sds * math.sqrt(p * (1 - p) / n)


# --- the hash layout ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user_key,salt,expected",
    [
        ("user-1", "canary-7", 0.03340246646004774),
        ("alice", "ckpt-42", 0.5707711202032503),
        ("", "", 0.4304816492364817),
    ],
)
def test_pinned_values(user_key, salt, expected):
    # Changing the layout would silently move users between arms of every live canary.
    assert bucket(user_key, salt) == expected


@given(st.text(), st.text())
def test_matches_documented_formula_and_range(user_key, salt):
    digest = hashlib.sha256(salt.encode() + b"\x00" + user_key.encode()).digest()
    top64 = int.from_bytes(digest[:8], "big")
    b = bucket(user_key, salt)
    assert 0.0 <= b < 1.0
    # The top 53 bits of top64 / 2**64: within one float step below the exact fraction.
    assert 0.0 <= top64 / 2**64 - b < 2.0**-53 + 1e-18


def test_largest_hash_stays_below_one(monkeypatch):
    # Naive top64 / 2**64 rounds 2**64 - 1 up to exactly 1.0; 100 % must still include it.
    class AllOnes:
        def digest(self) -> bytes:
            return b"\xff" * 32

    monkeypatch.setattr(canary_mod.hashlib, "sha256", lambda data: AllOnes())
    assert bucket("u", "s") < 1.0
    assert in_canary("u", "s", 100.0)
    assert not in_canary("u", "s", 99.9999)


def test_stable_across_calls(users):
    first = [bucket(u, SALT_A) for u in users[:1000]]
    again = [bucket(u, SALT_A) for u in users[:1000]]
    assert first == again
    assert [in_canary(u, SALT_A, 10) for u in users[:1000]] == [
        in_canary(u, SALT_A, 10) for u in users[:1000]
    ]


def test_salt_and_key_are_separated():
    # Without the separator both would hash "abc": salt "a" + key "bc", salt "ab" + key "c".
    assert bucket("bc", "a") != bucket("c", "ab")
    assert bucket("user", "x") != bucket("x", "user")


# --- the split ------------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [1, 5, 25, 50])
def test_fraction_matches_percent(users, buckets_a, percent):
    p = percent / 100
    share = sum(in_canary(u, SALT_A, percent) for u in users) / N_USERS
    assert abs(share - p) <= _binomial_slack(p, N_USERS)
    # Same answer from the precomputed buckets: in_canary is bucket < percent / 100.
    assert share == sum(b < p for b in buckets_a) / N_USERS


def test_buckets_are_uniform(buckets_a):
    bins = [0] * 20
    for b in buckets_a:
        bins[int(b * 20)] += 1
    expected = N_USERS / 20
    chi2 = sum((c - expected) ** 2 / expected for c in bins)
    assert chi2 < 43.8  # 99.9th percentile of chi-square with 19 degrees of freedom


def test_zero_and_hundred_percent(users):
    assert not any(in_canary(u, SALT_A, 0) for u in users[:5000])
    assert all(in_canary(u, SALT_A, 100) for u in users[:5000])


def test_monotone_in_percent(users):
    percents = [0, 0.5, 1, 5, 10, 25, 50, 75, 99, 100]
    previous: set[str] = set()
    for percent in percents:
        members = {u for u in users if in_canary(u, SALT_A, percent)}
        assert previous <= members, f"raising to {percent}% dropped users"
        previous = members


@given(st.text(), st.text(), st.floats(0, 100), st.floats(0, 100))
def test_monotone_property(user_key, salt, p1, p2):
    low, high = sorted((p1, p2))
    if in_canary(user_key, salt, low):
        assert in_canary(user_key, salt, high)


def test_salts_give_independent_splits(buckets_a, buckets_b):
    in_a = [b < 0.5 for b in buckets_a]
    in_b = [b < 0.5 for b in buckets_b]
    both = sum(a and b for a, b in zip(in_a, in_b)) / N_USERS
    assert abs(both - 0.25) <= _binomial_slack(0.25, N_USERS)
    # The small canaries are not the same people either: 5 % and 5 % overlap by about 0.25 %.
    small_both = sum(a < 0.05 and b < 0.05 for a, b in zip(buckets_a, buckets_b)) / N_USERS
    assert abs(small_both - 0.0025) <= _binomial_slack(0.0025, N_USERS)


def test_salts_are_uncorrelated(buckets_a, buckets_b):
    mean_a = sum(buckets_a) / N_USERS
    mean_b = sum(buckets_b) / N_USERS
    cov = sum((a - mean_a) * (b - mean_b) for a, b in zip(buckets_a, buckets_b)) / N_USERS
    corr = cov / (1 / 12)  # each is uniform on [0, 1), variance 1/12
    assert abs(corr) < 4.5 / math.sqrt(N_USERS)


# --- choose_version -------------------------------------------------------------------------


def test_anonymous_gets_production():
    for key in (None, ""):
        assert choose_version(key, "prod", "canary", 100, SALT_A) == "prod"


def test_no_canary_or_zero_percent_gets_production(users):
    for u in users[:2000]:
        assert choose_version(u, "prod", None, 50, SALT_A) == "prod"
        assert choose_version(u, "prod", "canary", 0, SALT_A) == "prod"


def test_full_canary_gets_canary(users):
    assert all(choose_version(u, "prod", "canary", 100, SALT_A) == "canary" for u in users[:2000])


def test_choice_follows_bucket(users):
    for u in users[:5000]:
        expected = "canary" if in_canary(u, SALT_A, 10) else "prod"
        assert choose_version(u, "prod", "canary", 10, SALT_A) == expected


def test_choice_depends_on_salt(users):
    by_a = [choose_version(u, "prod", "canary", 50, SALT_A) for u in users[:5000]]
    by_b = [choose_version(u, "prod", "canary", 50, SALT_B) for u in users[:5000]]
    assert by_a != by_b


@pytest.mark.parametrize("percent", [-0.1, 100.01, 1e9, math.nan, math.inf, -math.inf])
def test_invalid_percent(percent):
    with pytest.raises(ValueError, match="percent"):
        choose_version("u", "prod", "canary", percent, SALT_A)
    with pytest.raises(ValueError, match="percent"):
        choose_version("u", "prod", None, percent, SALT_A)
    with pytest.raises(ValueError, match="percent"):
        choose_version(None, "prod", "canary", percent, SALT_A)
    with pytest.raises(ValueError, match="percent"):
        in_canary("u", SALT_A, percent)
