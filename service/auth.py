"""API keys and scopes.

Keys are ``prospect_`` + 256 random bits (``secrets.token_urlsafe``), so a fast SHA-256 digest
is safe to store and to look up by (no slow password hash on the request path). Scopes:
``ingest`` (send feedback), ``read`` (list, export, balance), ``admin`` (everything). ``read``
does not imply ``ingest``: a dashboard's key cannot write telemetry.

Lookups are cached per process for ``key_cache_ttl_s`` (default 5 s): a revoked key keeps
working for at most that long in each API process. Expiry is checked on every request.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.errors import ApiError
from service.models import ApiKey, api_keys

KEY_PREFIX = "prospect_"
SCOPES = ("ingest", "read", "admin")


@dataclass(frozen=True)
class KeyInfo:
    id: int
    scopes: frozenset[str]
    expires_at: datetime | None
    revoked: bool

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_scopes(scopes: list[str] | str) -> list[str]:
    items = scopes.split(",") if isinstance(scopes, str) else scopes
    out = sorted({s.strip() for s in items if s.strip()})
    bad = [s for s in out if s not in SCOPES]
    if bad or not out:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)}; got {items!r}")
    return out


def create_key(
    session: Session,
    scopes: list[str] | str,
    name: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key; return the row and the secret (shown once, never stored)."""
    secret = new_key()
    row = ApiKey(
        name=name,
        display_prefix=secret[: len(KEY_PREFIX) + 6],
        digest=digest(secret),
        scopes=",".join(parse_scopes(scopes)),
        created_at=datetime.now(UTC),
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, secret


def revoke_key(session: Session, key_id: int) -> bool:
    res = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return bool(res.rowcount)


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


class KeyStore:
    """Looks keys up by digest, with a short per-process TTL cache of positive results."""

    def __init__(self, engine: Engine, ttl_s: float) -> None:
        self.engine = engine
        self.ttl = ttl_s
        self._cache: dict[str, tuple[float, KeyInfo]] = {}
        self._lock = threading.Lock()

    def cached(self, key_digest: str) -> KeyInfo | None:
        hit = self._cache.get(key_digest)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        return None

    def load(self, key_digest: str) -> KeyInfo | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(api_keys.c.id, api_keys.c.scopes, api_keys.c.expires_at,
                       api_keys.c.revoked_at).where(api_keys.c.digest == key_digest)
            ).first()
        if row is None:
            return None
        info = KeyInfo(row.id, frozenset(row.scopes.split(",")), row.expires_at,
                       row.revoked_at is not None)
        if self.ttl > 0:
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[key_digest] = (time.monotonic(), info)
        return info


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key") or None


_UNAUTH = {"WWW-Authenticate": "Bearer"}


def require(scope: str) -> Callable[[Request], Coroutine[Any, Any, KeyInfo]]:
    """FastAPI dependency: 401 without a valid key, 403 when the key lacks ``scope``."""

    async def dependency(request: Request) -> KeyInfo:
        key = _presented_key(request)
        if key is None:
            raise ApiError(401, "unauthenticated",
                           "missing API key: send 'Authorization: Bearer <key>'",
                           [{"field": "Authorization", "message": "missing"}], _UNAUTH)
        store: KeyStore = request.app.state.keys
        key_digest = digest(key)
        info = store.cached(key_digest)
        if info is None:
            info = await run_in_threadpool(store.load, key_digest)
        if info is None or info.revoked:
            raise ApiError(401, "unauthenticated", "unknown or revoked API key",
                           [{"field": "Authorization", "message": "unknown or revoked key"}],
                           _UNAUTH)
        if info.expires_at is not None and info.expires_at <= datetime.now(UTC):
            raise ApiError(401, "unauthenticated", "expired API key",
                           [{"field": "Authorization", "message": "expired key"}], _UNAUTH)
        if not info.allows(scope):
            raise ApiError(403, "forbidden", f"this key lacks the '{scope}' scope",
                           [{"field": "Authorization", "message": f"needs scope {scope}"}])
        return info

    return dependency
