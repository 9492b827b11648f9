"""Per-key rate limits: a token bucket per (class of request, API key), 429 with Retry-After.

Classes follow what a request does, not what the key may do, so an admin key that ingests
draws from the ingest bucket:

* ``ingest``: POST /v1/feedback, /v1/feedback/batch, /v1/feedback/import-pairs and the
  serving call /v1/serve (frontend traffic: generous by default);
* ``read``: every other GET/HEAD under /v1;
* ``admin``: every other method under /v1 (starting jobs, promotions, erasure, ...).

Only requests that carry a live key the key store knows are counted (the key lookup is the
auth's own cached one): a request with no key or an unknown key is answered 401 by the auth
dependency and cannot fill the bucket table with garbage. The dashboard (session cookies) and
/metrics, /healthz, /readyz are not limited here.

Where the buckets live: by default in each API process (exact within a process; with N
gunicorn workers a key can reach N times the configured rate, since a connection lands on
any worker). With ``PROSPECT_RATE_LIMIT_REDIS_URL`` every process and replica shares one
bucket per key through an atomic Lua script on Redis (Redis's clock, so API hosts' clocks do
not matter). If Redis fails, the process falls back to its own buckets for a few seconds
and logs it once: a rate limiter must not take ingestion down with it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import KeyStore, _presented_key, digest
from service.errors import ApiError
from service.settings import Settings

log = logging.getLogger("prospect.ratelimit")

CLASSES = ("ingest", "read", "admin")
_INGEST_PATHS = frozenset({"/v1/feedback", "/v1/feedback/batch", "/v1/feedback/import-pairs"})
_READ_METHODS = frozenset({"GET", "HEAD"})
#: After a Redis error, use the local buckets this long before trying Redis again.
REDIS_BACKOFF_S = 5.0


def classify(method: str, path: str) -> str | None:
    """The bucket class of a request, or None when it is not rate limited."""
    if not path.startswith("/v1/"):
        return None
    path = path.rstrip("/") or "/"
    if path == "/v1/serve" or (method == "POST" and path in _INGEST_PATHS):
        return "ingest"
    if method in _READ_METHODS:
        return "read"
    if method == "OPTIONS":
        return None
    return "admin"


@dataclass(frozen=True)
class Limit:
    per_s: float
    burst: int

    @property
    def enabled(self) -> bool:
        return self.per_s > 0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: Seconds until one token is available (0 when allowed).
    retry_after_s: float = 0.0


def limits_from(settings: Settings) -> dict[str, Limit]:
    return {
        "ingest": Limit(settings.rate_limit_ingest_per_s, settings.rate_limit_ingest_burst),
        "read": Limit(settings.rate_limit_read_per_s, settings.rate_limit_read_burst),
        "admin": Limit(settings.rate_limit_admin_per_s, settings.rate_limit_admin_burst),
    }


class LocalBuckets:
    """Token buckets in this process's memory. The table holds one entry per (class, key id)
    of keys that exist, so it is bounded by the number of keys."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._state: dict[tuple[str, int], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, cls: str, key_id: int, limit: Limit) -> Decision:
        now = self._clock()
        with self._lock:
            tokens, last = self._state.get((cls, key_id), (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + max(0.0, now - last) * limit.per_s)
            if tokens >= 1.0:
                self._state[(cls, key_id)] = (tokens - 1.0, now)
                return Decision(True)
            self._state[(cls, key_id)] = (tokens, now)
        return Decision(False, (1.0 - tokens) / limit.per_s)


#: KEYS[1] = bucket; ARGV = per_s, burst. Returns {allowed, retry_after_s as a string} (a Lua
#: number would be truncated to an integer on the way back).
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(s[1]) or burst
local ts = tonumber(s[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


class RedisBuckets:
    """Shared buckets on Redis. One asyncio client per event loop (a client's connections
    belong to the loop that opened them; tests run several loops in one process)."""

    def __init__(self, url: str, prefix: str = "prospect:ratelimit:") -> None:
        self.url = url
        self.prefix = prefix
        self._clients: dict[int, tuple[Any, Any]] = {}

    def _script(self) -> Any:
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        hit = self._clients.get(id(loop))
        if hit is None or hit[0] is not loop:
            client = aioredis.Redis.from_url(self.url, socket_timeout=0.5,
                                             socket_connect_timeout=0.5)
            hit = (loop, client.register_script(_LUA))
            self._clients[id(loop)] = hit
        return hit[1]

    async def take(self, cls: str, key_id: int, limit: Limit) -> Decision:
        script = self._script()
        allowed, wait = await script(keys=[f"{self.prefix}{cls}:{key_id}"],
                                     args=[repr(limit.per_s), str(limit.burst)])
        if int(allowed):
            return Decision(True)
        wait = wait.decode() if isinstance(wait, bytes) else str(wait)
        return Decision(False, float(wait))


class RateLimiter:
    """Decides per request; shared buckets when a Redis URL is set, else local ones."""

    def __init__(self, settings: Settings) -> None:
        self.limits = limits_from(settings)
        self.local = LocalBuckets()
        self.redis = (RedisBuckets(settings.rate_limit_redis_url)
                      if settings.rate_limit_redis_url else None)
        self._redis_down_until = 0.0

    @property
    def enabled(self) -> bool:
        return any(limit.enabled for limit in self.limits.values())

    async def take(self, cls: str, key_id: int) -> Decision:
        limit = self.limits[cls]
        if not limit.enabled:
            return Decision(True)
        if self.redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                return await self.redis.take(cls, key_id, limit)
            except Exception as exc:  # noqa: BLE001 - any Redis failure: fall back, say so
                self._redis_down_until = time.monotonic() + REDIS_BACKOFF_S
                log.warning("rate limit store unavailable (%s); using per-process buckets "
                            "for %.0f s", exc.__class__.__name__, REDIS_BACKOFF_S)
        return self.local.take(cls, key_id, limit)


def too_many(cls: str, limit: Limit, decision: Decision) -> ApiError:
    retry = max(1, math.ceil(decision.retry_after_s))
    return ApiError(
        429, "rate_limited",
        f"too many requests for this key ({cls}: {limit.per_s:g}/s, burst {limit.burst}); "
        f"retry after {retry} s",
        [{"field": "Authorization", "message": f"rate limit of the {cls} class exceeded"}],
        headers={"Retry-After": str(retry)})


class RateLimitMiddleware:
    """Answers 429 before the body is read, so a limited client costs no body buffering."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, keys: KeyStore) -> None:
        self.app = app
        self.limiter = limiter
        self.keys = keys

    async def _key_id(self, scope: Scope) -> int | None:
        key = _presented_key(Request(scope))
        if key is None:
            return None
        key_digest = digest(key)
        info = self.keys.cached(key_digest)
        if info is None:
            try:
                info = await run_in_threadpool(self.keys.load, key_digest)
            except Exception:  # noqa: BLE001 - database down: the auth dependency answers 503
                return None
        if info is None or info.revoked:
            return None
        if info.expires_at is not None and info.expires_at <= datetime.now(UTC):
            return None  # the auth answers 401; a 429 would invite a retry that cannot work
        return info.id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cls = (classify(scope["method"], scope["path"])
               if scope["type"] == "http" and self.limiter.enabled else None)
        if cls is None or not self.limiter.limits[cls].enabled:
            await self.app(scope, receive, send)
            return
        key_id = await self._key_id(scope)
        if key_id is not None:
            decision = await self.limiter.take(cls, key_id)
            if not decision.allowed:
                err = too_many(cls, self.limiter.limits[cls], decision)
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
