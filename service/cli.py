"""The `prospect` command: database, API keys, the production server and the demo."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from service.settings import INSECURE_DEV_USER_ID_KEY, Settings

app = typer.Typer(help="Prospect: feedback ingestion and KTO training.", no_args_is_help=True)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (scopes: ingest, read, admin).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _settings() -> Settings:
    """Settings from PROSPECT_* env; a bad value is one line naming the variable, exit 2."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""  # the variable, not an item inside it
        name = f"PROSPECT_{field.upper()}" if field else "settings"
        typer.echo(f"error: {name}: {err['msg']}", err=True)
        raise typer.Exit(2) from None
    except SettingsError as exc:  # a JSON-valued variable that does not parse
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def parse_expiry(value: str | None, now: datetime | None = None) -> datetime | None:
    """'30d', '12h', '90m' or an ISO 8601 timestamp (naive means UTC). A time not after ``now``
    is refused: the key would be dead on arrival, and a script would not notice."""
    if value is None:
        return None
    now = now or datetime.now(UTC)
    m = _DURATION.match(value.strip())
    try:
        if m:
            ts = now + timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        else:
            ts = datetime.fromisoformat(value)
            ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
    except ValueError:
        raise typer.BadParameter("use a duration like 30d/12h or an ISO 8601 time",
                                 param_hint="'--expires'") from None
    except OverflowError:
        raise typer.BadParameter(f"{value!r} is too far in the future",
                                 param_hint="'--expires'") from None
    if ts <= now:
        raise typer.BadParameter(f"{value!r} is not in the future", param_hint="'--expires'")
    return ts


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(
        help="Alembic revision to upgrade to (head: the newest).")] = "head") -> None:
    """Apply Alembic migrations to PROSPECT_DATABASE_URL."""
    from alembic.util import CommandError

    from service import migrate

    settings = _settings()
    # progress: Alembic's "Running upgrade a -> b" lines on stderr, as its own CLI shows them
    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(logging.Formatter("%(message)s"))
    alembic_log = logging.getLogger("alembic.runtime.migration")
    alembic_log.addHandler(progress)
    level = alembic_log.level
    alembic_log.setLevel(logging.INFO)
    try:
        with _db_errors(settings):
            migrate.upgrade(settings, revision)
    except migrate.MigrationsNotFound as exc:
        raise typer.BadParameter(str(exc), param_hint="PROSPECT_MIGRATIONS_DIR") from None
    except CommandError as exc:  # e.g. an unknown revision
        raise typer.BadParameter(str(exc), param_hint="'REVISION'") from None
    finally:
        alembic_log.removeHandler(progress)
        alembic_log.setLevel(level)
    typer.echo(f"database at {revision}: {_redact(settings.database_url)}")


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


@contextmanager
def _db_errors(settings: Settings) -> Iterator[None]:
    """A database that is down, missing or not migrated is the operator's to fix: one line
    naming the (redacted) URL and exit 1, not a SQLAlchemy traceback."""
    from sqlalchemy.exc import DBAPIError

    try:
        yield
    except DBAPIError as exc:
        orig = exc.orig if exc.orig is not None else exc
        lines = str(orig).strip().splitlines() or [type(orig).__name__]
        detail = lines[0]
        missing_table = (getattr(orig, "sqlstate", None) == "42P01"  # Postgres undefined_table
                         or "no such table" in detail)
        hint = " (not migrated? run `prospect db upgrade`)" if missing_table else ""
        typer.echo(f"error: database {_redact(settings.database_url)}: {detail}{hint}", err=True)
        raise typer.Exit(1) from None


@contextmanager
def _session() -> Iterator:
    from service.db import make_engine, make_sessionmaker

    settings = _settings()
    with _db_errors(settings), make_sessionmaker(make_engine(settings)).begin() as session:
        yield session


@keys_app.command("create")
def keys_create(
    scope: Annotated[list[str], typer.Option(help="ingest, read or admin; repeatable.")],
    name: Annotated[str | None, typer.Option(help="A label for `keys list`.")] = None,
    expires: Annotated[str | None, typer.Option(help="Duration (30d, 12h) or ISO time.")] = None,
) -> None:
    """Create a key and print it once; only its SHA-256 digest is stored."""
    from service.auth import create_key

    expires_at = parse_expiry(expires)
    try:
        with _session() as session:
            row, secret = create_key(session, scope, name=name, expires_at=expires_at)
            key_id, scopes = row.id, row.scopes
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(secret)
    expiry = expires_at.isoformat() if expires_at else "never"
    typer.echo(f"id={key_id} scopes={scopes} expires={expiry} "
               "(store the key now: it is not shown again)", err=True)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (id, prefix, scopes, state); secrets are never shown."""
    from service.auth import list_keys

    now = datetime.now(UTC)
    with _session() as session:
        rows = list_keys(session)
        typer.echo(f"{'id':>4}  {'prefix':<16} {'scopes':<18} {'state':<8} {'expires':<25} name")
        for r in rows:
            state = ("revoked" if r.revoked_at else
                     "expired" if r.expires_at and r.expires_at <= now else "active")
            exp = r.expires_at.isoformat(timespec="seconds") if r.expires_at else "never"
            typer.echo(f"{r.id:>4}  {r.display_prefix + '…':<16} {r.scopes:<18} {state:<8} "
                       f"{exp:<25} {r.name or ''}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="The id from `keys list`.")]) -> None:
    """Revoke a key; API processes stop accepting it within PROSPECT_KEY_CACHE_TTL_S."""
    from service.auth import revoke_key

    with _session() as session:
        done = revoke_key(session, key_id)
    if not done:
        typer.echo(f"no active key with id {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked key {key_id}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(
        envvar="PROSPECT_HOST", help="Address to bind (0.0.0.0: all interfaces).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="PROSPECT_PORT", help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(
        envvar="PROSPECT_WORKERS", help="Worker processes (about one per core).")] = 2,
    timeout: Annotated[int, typer.Option(
        envvar="PROSPECT_WORKER_TIMEOUT_S", help="Seconds before a stuck worker is restarted.")
    ] = 60,
) -> None:
    """Run the API in production mode: gunicorn with uvicorn workers (settings from env)."""
    _fresh_metrics_dir(port)
    args = [
        sys.executable, "-m", "gunicorn", "service.app:create_app()",
        "--worker-class", "uvicorn_worker.UvicornWorker",
        "--workers", str(workers), "--bind", f"{host}:{port}",
        "--timeout", str(timeout), "--graceful-timeout", "20", "--keep-alive", "5",
    ]
    os.execv(sys.executable, args)


def _fresh_metrics_dir(port: int) -> None:
    """prometheus-client's multiprocess mode, so /metrics sums every gunicorn worker: an empty
    folder per server start (PROMETHEUS_MULTIPROC_DIR, or one under the temp dir)."""
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR")
                  or Path(tempfile.gettempdir()) / f"prospect-metrics-{port}")
    if folder.exists():
        for item in folder.iterdir():
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


@app.command()
def demo(
    workdir: Annotated[str, typer.Option(
        help="Where the demo's files go: a new or empty folder, or an earlier demo's "
             "(emptied first).")
    ] = "./var/demo",
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of feedback -> job -> rollout.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of everything random.")] = 0,
    traffic: Annotated[int, typer.Option(min=50, help="Requests served per round.")] = 400,
    keep_running: Annotated[bool, typer.Option(
        help="Keep the API (and its dashboard) up after the rounds until Enter.")] = True,
) -> None:
    """The whole loop on this machine: SQLite, a broker in a SQLite file, a real worker, CPU,
    a tiny model made here. Feedback in, λD/λU, KTO job, gate, canary, promotion or rollback."""
    try:
        from worker.demo.loop import DemoConfig, WorkdirNotDemo, run_demo
    except ModuleNotFoundError as exc:  # pragma: no cover - the API image has no worker
        typer.echo(f"the demo needs the training extra: pip install 'prospect[train]' ({exc})",
                   err=True)
        raise typer.Exit(2) from None
    try:
        result = run_demo(workdir, DemoConfig(rounds=rounds, seed=seed, traffic=traffic),
                          keep_running=keep_running, echo=typer.echo)
    except WorkdirNotDemo as exc:
        raise typer.BadParameter(str(exc), param_hint="'--workdir'") from None
    raise typer.Exit(0 if result.never_fell else 1)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(
        help="Comma-separated queues: `gpu` for training, `default` for light tasks.")] = "gpu",
    pool: Annotated[str, typer.Option(
        help="solo for GPU workers (CUDA does not survive fork); threads or prefork for "
             "the default queue.")] = "solo",
    concurrency: Annotated[int, typer.Option(help="Tasks at once (1 per GPU worker).")] = 1,
    name: Annotated[str | None, typer.Option(help="Worker node name (default: host).")] = None,
    loglevel: Annotated[str, typer.Option(
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL.")] = "INFO",
) -> None:
    """Run a Celery worker (settings from PROSPECT_* env; broker PROSPECT_BROKER_URL)."""
    from worker.celery_app import app as celery_app

    argv = ["worker", "-Q", queues, "--pool", pool, "--concurrency", str(concurrency),
            "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if name:
        argv += ["--hostname", name]
    celery_app.worker_main(argv)


@app.command()
def beat(
    schedule: Annotated[str, typer.Option(
        help="File where beat keeps its last run times.")] = "./var/celerybeat-schedule",
    loglevel: Annotated[str, typer.Option(
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL.")] = "INFO",
) -> None:
    """Run the scheduler (exactly one per deployment): reconciler, retraining check, π_ref
    snapshots, gate sweep, canary guard, retention, webhooks, feedback retention. Intervals:
    PROSPECT_RECONCILE_INTERVAL_S, _RETRAIN_CHECK_INTERVAL_S, _SNAPSHOT_INTERVAL_S,
    _GATE_SWEEP_INTERVAL_S, _GUARD_INTERVAL_S, _RETENTION_INTERVAL_S, _NOTIFY_INTERVAL_S,
    _FEEDBACK_RETENTION_INTERVAL_S (0: off)."""
    from pathlib import Path

    from worker.celery_app import app as celery_app

    Path(schedule).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", "--schedule", schedule, "--loglevel", loglevel])


@app.command()
def erase(
    user_id: Annotated[str | None, typer.Option(help="The user id as the frontend sent it.")] = None,
    user_hash: Annotated[str | None, typer.Option(help="Or the keyed hash as stored (64 hex).")] = None,
    reason: Annotated[str | None, typer.Option(help="For the audit trail, e.g. the ticket; no personal data.")
                      ] = None,
) -> None:
    """Erase all feedback of one user, as POST /v1/erasures does (for scripts and when the API is
    down): prints the erasure record (events deleted, jobs that had trained on them) as JSON."""
    import json

    from pydantic import ValidationError

    from service import erasure
    from service.api.privacy import ErasureIn
    from service.db import make_engine
    from service.ingest import hash_user_id

    try:
        body = ErasureIn(user_id=user_id, user_hash=user_hash, reason=reason)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "user_id/user_hash"
        raise typer.BadParameter(f"{field}: {err['msg']}") from None
    settings = _settings()
    if body.user_id and settings.user_id_key == INSECURE_DEV_USER_ID_KEY and not settings.is_sqlite:
        # the API warns of this key at start; here it would hash to nothing the API stored,
        # "erase" 0 events and exit 0 while the user's feedback stays
        typer.echo("error: PROSPECT_USER_ID_KEY is not set (the development default): set it "
                   "to the API's key, or pass --user-hash", err=True)
        raise typer.Exit(2)
    engine = make_engine(settings)
    try:
        h = body.user_hash or hash_user_id(body.user_id or "", settings.user_id_key)
        with _db_errors(settings):
            res = erasure.erase_user(engine, settings, h, actor="cli", reason=body.reason)
    finally:
        engine.dispose()
    typer.echo(json.dumps(res.as_dict(), indent=2))


def _register_train() -> None:
    """`prospect train` lives in worker/cli.py; it imports torch only when it runs, so the
    API image (no torch) still has a working `prospect` command."""
    try:
        from worker.cli import train_command
    except ModuleNotFoundError as exc:  # pragma: no cover - an install without worker/
        if exc.name not in ("worker", "worker.cli"):
            raise
        return
    app.command("train", help="One-off KTO training from a JSONL export.")(train_command)


_register_train()


if __name__ == "__main__":  # pragma: no cover
    app()
