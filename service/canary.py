"""Stable canary bucketing: which users see the canary checkpoint.

A user's bucket is a hash of (salt, user key), so it needs no storage and is the same on every
API worker and every request. The salt is the canary's checkpoint or rollout id: each canary
then gets its own, independent split, so the same users are not the guinea pigs every time.
Because membership is ``bucket < percent / 100``, raising the percentage only adds users:
nobody flips back and forth between versions while a rollout ramps up.
"""

from __future__ import annotations

import hashlib

__all__ = ["bucket", "in_canary", "choose_version"]

_MANTISSA_BITS = 53


def bucket(user_key: str, salt: str) -> float:
    """The user's position in [0, 1) for this salt.

    sha256(salt + "\\x00" + user_key); the first 8 bytes, big-endian, read as a fraction of
    2**64. Only the top 53 bits are kept: a float holds exactly that many, and rounding the
    full 64 bits could give exactly 1.0. The NUL separator keeps ("ab", "c") and ("a", "bc")
    apart. Changing any of this reshuffles every live canary, so a test pins known values.
    """
    digest = hashlib.sha256(salt.encode() + b"\x00" + user_key.encode()).digest()
    top64 = int.from_bytes(digest[:8], "big")
    return (top64 >> (64 - _MANTISSA_BITS)) / 2.0**_MANTISSA_BITS


def _check_percent(percent: float) -> None:
    # `not a <= x <= b` is also true for NaN.
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percent must be in [0, 100], got {percent!r}")


def in_canary(user_key: str, salt: str, percent: float) -> bool:
    """Whether the user is in a canary that takes ``percent`` % of users."""
    _check_percent(percent)
    return bucket(user_key, salt) < percent / 100.0


def choose_version(
    user_key: str | None,
    production: str,
    canary: str | None,
    percent: float,
    salt: str,
) -> str:
    """The version to serve this user.

    Anonymous users (no key, or an empty one) get production: without a stable key they would
    hop between versions from request to request, and their feedback could not be attributed
    to one arm. ``percent`` is checked even when there is no canary, so a bad setting fails
    when it is made rather than when a canary is first attached.
    """
    _check_percent(percent)
    if canary is None or percent == 0 or not user_key:
        return production
    return canary if in_canary(user_key, salt, percent) else production
