"""Every knob of the service, read from ``PROSPECT_*`` environment variables.

One object, passed explicitly to ``create_app`` and the CLI, so tests and the demo can run
several configurations side by side without touching the process environment.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The embedded default: a SQLite file, so `make demo` needs no server.
DEFAULT_DATABASE_URL = "sqlite:///./var/prospect.db"
#: A broker in a SQLite file beside the database, so the embedded default runs a real worker.
DEFAULT_BROKER_URL = "sqla+sqlite:///./var/broker.db"
#: Only for laptops and tests; production must set PROSPECT_USER_ID_KEY.
INSECURE_DEV_USER_ID_KEY = "prospect-dev-only-user-id-key-change-me"
#: Registry: env values that mean "unset" for the optional gate/guard/webhook settings.
NONE_WORDS = ("", "none", "null", "off")
#: Retention windows and ages past this (a thousand years) overflow date arithmetic.
MAX_RETENTION_DAYS = 365_000.0
#: The job-failure sweep (service/notify.py) re-announces failures this recent unless their
#: outbox row still exists, so delivered rows must be kept at least this long.
JOB_FAILURE_LOOKBACK_DAYS = 1.0


class Settings(BaseSettings):
    """Service configuration. Every field maps to ``PROSPECT_<FIELD_NAME>``."""

    #: "null" in a variable means None, so a child process can be handed an explicit None.
    model_config = SettingsConfigDict(env_prefix="PROSPECT_", env_file=None, extra="ignore",
                                      env_parse_none_str="null")

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

    # ---- training jobs (worker, beat and the API's /v1/jobs)
    #: Celery broker. The embedded default needs no server (kombu's SQLAlchemy transport);
    #: production: redis://redis:6379/0.
    broker_url: str = DEFAULT_BROKER_URL
    #: Prefix for every broker key (Redis), so several deployments or test runs can share one
    #: Redis without seeing each other's queues.
    broker_key_prefix: str = ""
    #: Redis redelivers an unacknowledged message after this long, even while it still runs;
    #: the job-row claim makes such a redelivery harmless, the long timeout makes it rare.
    broker_visibility_timeout_s: int = Field(default=6 * 3600, ge=60)
    #: Alembic's migrations folder. Default: beside the service package (a checkout or an
    #: editable install), else ./migrations (the images copy it to their working directory; a
    #: wheel does not carry it).
    migrations_dir: str | None = None
    #: Root of π_ref snapshots and job outputs (shared by workers and the API).
    artifacts_root: str = "./var/artifacts"
    #: The `default` model line's base model: a Hugging Face id or a local folder.
    base_model: str | None = None
    #: Fraction of events (by a hash of event_id) that no job trains on; the gate scores them.
    holdout_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    #: At most this many events of one user in one job (the most recent); 0 disables the cap.
    max_events_per_user: int = Field(default=500, ge=0)
    #: A job needs events from at least this many distinct users.
    min_distinct_users: int = Field(default=1, ge=1)
    #: Postgres: creating a job waits this long for ingest transactions that hold ids below
    #: the newest event to end (milliseconds normally), then answers 503 ingestion_in_flight.
    freeze_wait_s: float = Field(default=10.0, ge=0)
    #: Attempts of a job (first run + re-queues after a lost worker) before it is failed.
    job_max_attempts: int = Field(default=3, ge=1)
    #: How often a running job's supervisor heartbeats its row, and how stale a heartbeat
    #: must be before the reconciler declares the worker lost.
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)
    #: A queued job whose message was sent this long ago is sent again (a broker that lost its
    #: queue); duplicates are harmless because a run starts only by claiming the row.
    requeue_after_s: float = Field(default=600.0, gt=0)
    #: How the training child starts: `python` (one process) or `accelerate` (accelerate
    #: launch, with PROSPECT_ACCELERATE_ARGS, e.g. "--multi_gpu --num_processes 4").
    train_launcher: Literal["python", "accelerate"] = "python"
    accelerate_args: str = ""
    #: Grace period between SIGTERM and SIGKILL when a run is cancelled, fenced or timed out.
    cancel_grace_s: float = Field(default=60.0, gt=0)
    #: Wall-clock limit of one training attempt, in seconds: a child still running then (a hung
    #: NCCL call or data loader keeps its supervisor heartbeating) is stopped and the job
    #: failed. 0 (the default): no limit, since training time varies by orders of magnitude
    #: with model and data; ops should set it above their longest expected run.
    job_max_runtime_s: float = Field(default=0.0, ge=0)
    #: Beat: how often to reconcile job rows with the broker, check for retraining and
    #: snapshot π_ref (seconds; 0 disables that schedule).
    reconcile_interval_s: float = Field(default=30.0, ge=0)
    retrain_check_interval_s: float = Field(default=300.0, ge=0)
    snapshot_interval_s: float = Field(default=3600.0, ge=0)
    #: Scheduled retraining starts when this many new events (and min_per_class of each
    #: class) arrived since the last successful job.
    retrain_min_events: int = Field(default=1000, ge=1)
    #: After a line's job fails, scheduled retraining waits this long before queuing another,
    #: doubled per further consecutive failure (at most a day; cancelled jobs do not count;
    #: 0 disables the wait).
    retrain_failure_backoff_s: float = Field(default=600.0, ge=0)
    #: Defaults for scheduled jobs (the API may override each per job).
    default_job_params: dict[str, Any] = Field(default_factory=dict)

    # ---- dashboard (/dashboard), metrics (/metrics) and logs
    #: Serve the ops pages under /dashboard.
    dashboard_enabled: bool = True
    #: Key that signs dashboard session cookies and CSRF tokens; every API replica needs the
    #: same one. Unset: derived from PROSPECT_USER_ID_KEY (already a shared secret).
    dashboard_session_key: str | None = Field(default=None, min_length=16)
    #: `Secure` on the session cookie. Browsers treat http://localhost as secure, so only a
    #: plain-HTTP deployment reached by another host name needs false.
    dashboard_cookie_secure: bool = True
    dashboard_cookie_samesite: Literal["lax", "strict"] = "lax"
    #: A dashboard login lasts this long (the key is also re-checked on every request).
    dashboard_session_ttl_s: int = Field(default=12 * 3600, ge=60)
    #: How often the pages poll their JSON endpoints (job page; the overview polls at 3x).
    dashboard_poll_interval_s: float = Field(default=5.0, ge=0.5)
    #: Serve Prometheus metrics at /metrics; with require_key it needs a read-scope key.
    metrics_enabled: bool = True
    metrics_require_key: bool = False
    #: json (one object per line, with request_id), text, or none (leave logging alone).
    log_format: Literal["json", "text", "none"] = "json"
    log_level: str = "INFO"

    # ---- registry: evaluation gate, rollout, live guard, retention, notifications
    # (service/registry.py, worker/gate.py, service/live.py, service/retention.py,
    # service/notify.py). A threshold set to null disables that check.
    #: Task evaluator for the gate, "package.module:function" (f(prompts, generations) ->
    #: float or {gate_task_metric: float}); e.g. "worker.kto.toy:arithmetic_accuracy".
    gate_task_evaluator: str | None = None
    gate_task_metric: str = "score"
    #: The checkpoint's task score may be at most this much below π_ref's.
    gate_task_tolerance: float | None = Field(default=0.0, ge=0.0)
    #: Held-out reward margin (β·r desirable − β·r undesirable) must be at least this.
    gate_min_margin: float | None = 0.0
    #: Sampled KL(policy‖π_ref) per sequence, in nats, at most this.
    gate_max_kl: float | None = Field(default=10.0, ge=0.0)
    #: |mean generation length / π_ref's − 1| at most this (the paper's length drift).
    gate_max_length_drift: float | None = Field(default=0.5, ge=0.0)
    #: Fewer held-out events than this: rejected (nothing reaches production on faith).
    gate_min_holdout_examples: int = Field(default=20, ge=1)
    #: At most this many held-out events are scored (the most recent).
    gate_max_holdout_examples: int = Field(default=2000, ge=1)
    #: "job": the held-out events of the job's own window and filters; "all": every
    #: held-out event up to the job's last event (within its line's feedback scope).
    gate_holdout_scope: Literal["job", "all"] = "job"
    gate_n_generate: int = Field(default=64, ge=0)
    gate_max_new_tokens: int = Field(default=64, ge=1)
    gate_batch_size: int = Field(default=16, ge=1)
    #: Evaluation attempts before a checkpoint is rejected as unevaluable.
    gate_max_attempts: int = Field(default=3, ge=1)
    #: Wall-clock limit of one evaluation child, in seconds (bounded work: held-out scoring
    #: and gate_n_generate samples); past it the child is stopped and the attempt counts as
    #: failed. 0: no limit.
    gate_max_runtime_s: float = Field(default=3600.0, ge=0)
    #: Deliveries of a π_ref snapshot whose worker stopped heartbeating (died copying it) before
    #: the gate sweep fails it instead of re-sending it again.
    snapshot_max_attempts: int = Field(default=3, ge=1)
    #: A running evaluation whose heartbeat is older than this is considered lost.
    gate_heartbeat_timeout_s: float = Field(default=300.0, gt=0)
    #: A pending checkpoint whose evaluation was sent this long ago is sent again.
    gate_resend_after_s: float = Field(default=600.0, gt=0)
    #: Beat: re-send evaluations of succeeded jobs that have no decision yet (0 disables).
    gate_sweep_interval_s: float = Field(default=60.0, ge=0)
    #: A candidate that passes the gate starts as a canary on this % of users (0: ops
    #: promote by hand).
    auto_canary_percent: float = Field(default=0.0, ge=0.0, le=100.0)
    #: The serving call caches each line's production/canary for this long per process.
    serving_cache_ttl_s: float = Field(default=1.0, ge=0.0)
    #: The live canary guard (always-valid mSPRT, service/rollout_stats.py), run by beat.
    guard_enabled: bool = True
    guard_interval_s: float = Field(default=60.0, ge=0)
    guard_auto_rollback: bool = True
    guard_auto_promote: bool = True
    guard_alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    guard_noninferiority_margin: float = Field(default=0.02, ge=0.0, lt=1.0)
    guard_min_samples: int = Field(default=200, ge=1)
    guard_max_samples: int | None = Field(default=None, ge=1)
    guard_tau: float = Field(default=0.1, gt=0.0)
    #: At most this many (latest) votes of one user count per arm; 0: no cap.
    guard_max_events_per_user: int = Field(default=50, ge=0)
    #: Retention (beat; 0 disables): files of retired/rejected checkpoints and of snapshots
    #: no live checkpoint or active job needs are removed beyond the newest `keep` of each
    #: kind per line, or past `max_age_days` (0: no age limit); never sooner than
    #: `min_age_s` after they left use.
    retention_interval_s: float = Field(default=3600.0, ge=0)
    retention_keep_retired: int = Field(default=2, ge=0)
    retention_keep_rejected: int = Field(default=2, ge=0)
    retention_keep_snapshots: int = Field(default=2, ge=0)
    retention_max_age_days: float = Field(default=0.0, ge=0.0, le=MAX_RETENTION_DAYS)
    retention_min_age_s: float = Field(default=3600.0, ge=0.0, le=MAX_RETENTION_DAYS * 86400)
    #: Also remove resume states (checkpoints/step-*) of finished jobs.
    retention_prune_resume_states: bool = True
    #: Webhook for job failure, gate decisions, promotions and rollbacks (unset: none).
    webhook_url: str | None = None
    #: Signs each body: X-Prospect-Signature: sha256=HMAC(secret, body).
    webhook_secret: str | None = None
    #: Limit on one whole POST (connect, send, answer), not on each socket read; below the
    #: 60 s lease a deliverer holds on a row, so no second deliverer posts it meanwhile.
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=50)
    webhook_max_attempts: int = Field(default=8, ge=1)
    #: Retry n waits backoff·2^(n−1) seconds.
    webhook_backoff_s: float = Field(default=5.0, ge=0.0)
    notify_interval_s: float = Field(default=15.0, ge=0)
    #: Outbox rows delivered (`sent`) or given up (`failed`) longer ago than this are deleted
    #: by the retention beat task (PROSPECT_RETENTION_INTERVAL_S); pending rows never are.
    #: 0 keeps them forever; otherwise at least a day (JOB_FAILURE_LOOKBACK_DAYS).
    webhook_keep_days: float = Field(default=30.0, ge=0.0, le=MAX_RETENTION_DAYS)

    # ---- security and data rights (service/ratelimit.py, service/redaction.py,
    # service/erasure.py, service/api/privacy.py; README "Security and data rights")
    #: Per-key token buckets, one per class of request: `ingest` (POST /v1/feedback* and the
    #: serving call: frontend traffic), `read` (other GETs), `admin` (other state changes).
    #: PER_S refills the bucket, BURST is its size; PER_S=0 turns that class's limit off.
    #: Over the limit: 429 with Retry-After. Ingest is generous (a guard against a runaway
    #: client, not traffic shaping). Without PROSPECT_RATE_LIMIT_REDIS_URL each API process
    #: keeps its own buckets (N gunicorn workers: up to N times the rate per key); with it,
    #: every process and replica shares them (and falls back to its own while Redis is down).
    rate_limit_ingest_per_s: float = Field(default=1000.0, ge=0)
    rate_limit_ingest_burst: int = Field(default=2000, ge=1)
    rate_limit_read_per_s: float = Field(default=100.0, ge=0)
    rate_limit_read_burst: int = Field(default=500, ge=1)
    rate_limit_admin_per_s: float = Field(default=20.0, ge=0)
    rate_limit_admin_burst: int = Field(default=200, ge=1)
    rate_limit_redis_url: str | None = None
    #: Origins allowed to call the API from a browser, comma-separated (e.g.
    #: "https://app.example.com"). Empty (the default): no Access-Control-* header is ever
    #: sent, so browsers refuse cross-origin calls. Credentials (cookies) are never allowed.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Replace e-mail addresses and phone numbers in prompts, completions, corrections and
    #: comments with [email] / [phone] before storage. Applied before the payload hash, so
    #: retries stay idempotent; events stored before switching it on keep their text.
    redact_pii: bool = False
    #: Delete feedback events whose occurred_at is older than this many days (beat task on the
    #: default queue; lineage of deleted events is recorded, see /v1/lineage/erased). 0 keeps
    #: events forever.
    feedback_retention_days: float = Field(default=0.0, ge=0.0, le=MAX_RETENTION_DAYS)
    feedback_retention_interval_s: float = Field(default=3600.0, ge=0)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        """PROSPECT_CORS_ORIGINS is a comma-separated list (a JSON list works too)."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [o.strip().rstrip("/") for o in v.split(",") if o.strip()]
        return v

    @field_validator("gate_task_evaluator", "gate_task_tolerance", "gate_min_margin",
                     "gate_max_kl", "gate_max_length_drift", "guard_max_samples",
                     "webhook_url", "webhook_secret", mode="before")
    @classmethod
    def _none_words(cls, v: Any) -> Any:
        """Registry: PROSPECT_GATE_MAX_KL=none (or null, off, empty) disables that check."""
        if isinstance(v, str) and v.strip().lower() in NONE_WORDS:
            return None
        return v

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, v: str | None) -> str | None:
        """Registry: urllib cannot POST to a URL without http(s) and a host (it raises before
        sending), which would fail every delivery forever; refuse it at startup."""
        if v is None:
            return v
        parts = urlsplit(v.strip())
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook_url: must be an http:// or https:// URL with a host")
        return v.strip()

    @field_validator("webhook_keep_days")
    @classmethod
    def _webhook_keep_days(cls, v: float) -> float:
        """Registry: a row pruned sooner than the job-failure sweep looks back would let that
        sweep queue the same job's failure again (its dedup key gone) and announce it twice."""
        if 0 < v < JOB_FAILURE_LOOKBACK_DAYS:
            raise ValueError(f"webhook_keep_days: 0 (keep forever) or at least "
                             f"{JOB_FAILURE_LOOKBACK_DAYS:g} day(s)")
        return v

    @model_validator(mode="after")
    def _guard_samples(self) -> Settings:
        """Registry: a cap below the minimum would make every guard decision fail later."""
        if self.guard_max_samples is not None and self.guard_max_samples < self.guard_min_samples:
            raise ValueError("guard_max_samples: must be at least guard_min_samples")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
