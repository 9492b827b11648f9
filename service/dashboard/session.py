"""Dashboard sessions and CSRF tokens: signed cookies, no server-side session store.

A login exchanges a read-scope API key (typed into a form, never put in a URL) for a cookie
holding ``{digest of the key, expiry, nonce}`` signed with HMAC-SHA256. No store means any
API replica can serve any request; the key itself is re-checked on every request (through
the same KeyStore as the API), so revoking it ends its dashboard sessions within the key
cache TTL. The digest is what the database already holds, never the key.

CSRF: every state-changing form carries a token derived from the session's nonce
(HMAC(secret, "csrf|" + nonce)), compared in constant time; the login form, which has no
session yet, uses a signed double-submit cookie. SameSite on both cookies and a
``Sec-Fetch-Site: cross-site`` refusal are extra layers, not the defence itself.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from service.settings import Settings

SESSION_COOKIE = "prospect_session"
LOGIN_CSRF_COOKIE = "prospect_login_csrf"
COOKIE_PATH = "/dashboard"
LOGIN_CSRF_TTL_S = 3600


def _same(a: str, b: str) -> bool:
    """Constant-time equality of any two strings: compare_digest refuses non-ASCII str, and a
    cookie or form field may hold anything."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def signing_key(settings: Settings) -> bytes:
    """The explicit dashboard key, else one derived from the user-id key (domain-separated,
    so a cookie signature reveals nothing about user-id hashes)."""
    if settings.dashboard_session_key:
        return settings.dashboard_session_key.encode()
    return hmac.digest(settings.user_id_key.encode(), b"prospect-dashboard-session-v1", "sha256")


@dataclass(frozen=True)
class Session:
    key_digest: str
    expires_at: int
    nonce: str


class Signer:
    def __init__(self, settings: Settings) -> None:
        self.key = signing_key(settings)
        self.ttl = settings.dashboard_session_ttl_s

    def _mac(self, purpose: bytes, data: bytes) -> str:
        return _b64(hmac.digest(self.key, purpose + b"|" + data, "sha256"))

    # ---- session cookie
    def issue(self, key_digest: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        body = _b64(orjson.dumps({"d": key_digest, "exp": int(now) + self.ttl,
                                  "n": secrets.token_urlsafe(16)}))
        return f"{body}.{self._mac(b'session', body.encode())}"

    def load(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session, or None when missing, tampered with, malformed or expired."""
        if not cookie or cookie.count(".") != 1 or len(cookie) > 1024:
            return None
        body, mac = cookie.split(".")
        if not _same(mac, self._mac(b"session", body.encode())):
            return None
        try:
            data: dict[str, Any] = orjson.loads(_unb64(body))
            sess = Session(str(data["d"]), int(data["exp"]), str(data["n"]))
        except Exception:  # noqa: BLE001 - signed but unreadable: treat as no session
            return None
        if sess.expires_at <= (time.time() if now is None else now):
            return None
        return sess

    # ---- CSRF
    def csrf_token(self, sess: Session) -> str:
        return self._mac(b"csrf", sess.nonce.encode())

    def check_csrf(self, sess: Session, token: str | None) -> bool:
        return bool(token) and _same(str(token), self.csrf_token(sess))

    def login_csrf(self) -> str:
        nonce = f"{int(time.time())}:{secrets.token_urlsafe(16)}"
        return f"{nonce}.{self._mac(b'login', nonce.encode())}"

    def check_login_csrf(self, cookie: str | None, field: str | None) -> bool:
        """The form's token equals the cookie's, and the cookie is ours and recent."""
        if not cookie or not field or not _same(cookie, field):
            return False
        nonce, _, mac = cookie.rpartition(".")
        if not nonce or not _same(mac, self._mac(b"login", nonce.encode())):
            return False
        try:
            issued = int(nonce.split(":", 1)[0])
        except ValueError:
            return False
        return time.time() - issued < LOGIN_CSRF_TTL_S
