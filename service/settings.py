"""Every knob of the service, read from ``PROSPECT_*`` environment variables.

One object, passed explicitly to ``create_app`` and the CLI, so tests and the demo can run
several configurations side by side without touching the process environment.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The embedded default: a SQLite file, so `make demo` needs no server.
DEFAULT_DATABASE_URL = "sqlite:///./var/prospect.db"
#: Only for laptops and tests; production must set PROSPECT_USER_ID_KEY.
INSECURE_DEV_USER_ID_KEY = "prospect-dev-only-user-id-key-change-me"


class Settings(BaseSettings):
    """Service configuration. Every field maps to ``PROSPECT_<FIELD_NAME>``."""

    model_config = SettingsConfigDict(env_prefix="PROSPECT_", env_file=None, extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    #: Seconds to wait for a new database connection before answering 503.
    db_connect_timeout_s: int = Field(default=5, ge=1)
    #: Per-statement limit (Postgres), so a stuck query cannot hold a request forever.
    db_statement_timeout_ms: int = Field(default=15_000, ge=100)
    #: SQLite busy_timeout: how long a writer waits for another process's write lock.
    sqlite_busy_timeout_ms: int = Field(default=5_000, ge=0)
    #: Shown in pg_stat_activity, to tell API, workers and tools apart.
    db_application_name: str = "prospect-api"
    db_pool_size: int = Field(default=8, ge=1)
    db_max_overflow: int = Field(default=8, ge=0)
    #: Seconds to wait for a pooled connection before answering 503.
    db_pool_timeout_s: float = Field(default=5.0, gt=0)

    #: HMAC-SHA256 key for user ids: raw user ids are never stored.
    user_id_key: str = Field(default=INSECURE_DEV_USER_ID_KEY, min_length=16)

    #: Request bodies above this many bytes get 413 before they are read into memory.
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_batch_items: int = Field(default=1000, ge=1)
    #: Limit for prompt, completion, correction and comment, in characters.
    max_text_chars: int = Field(default=100_000, ge=1)
    #: Limit for identifiers (event_id, model_version, user_id, session_id, ...).
    max_id_chars: int = Field(default=256, ge=8)
    max_prompt_messages: int = Field(default=256, ge=1)
    max_metadata_bytes: int = Field(default=8192, ge=64)
    max_metadata_depth: int = Field(default=4, ge=1)
    max_metadata_keys: int = Field(default=64, ge=1)
    #: occurred_at may lie at most this far ahead of the server clock (client clock skew).
    max_future_skew_s: int = Field(default=300, ge=0)

    #: Balancer: target λD·nD/(λU·nU) and the minimum events per class to allow training.
    target_ratio: float = Field(default=1.0, ge=1.0, le=1.5)
    min_per_class: int = Field(default=1, ge=1)

    #: API-key lookups are cached this long; a revoked key keeps working at most this long
    #: in each API process. 0 disables the cache.
    key_cache_ttl_s: float = Field(default=5.0, ge=0)
    #: Retry-After (seconds) sent with 503 when the database is unavailable.
    retry_after_s: int = Field(default=5, ge=1)

    default_page_size: int = Field(default=100, ge=1)
    max_page_size: int = Field(default=1000, ge=1)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
