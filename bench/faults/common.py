"""Shared pieces of the fault scenarios: throw-away servers on other ports, the API and worker
processes, and a load client that retries with the same event ids until acknowledged."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.settings import Settings  # noqa: E402
from worker.demo.runtime import free_port, migrate_with_keys, wait_http  # noqa: E402,F401

PG_ADMIN = os.environ.get("PROSPECT_TEST_PG_ADMIN_URL",
                          "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else name


class ThrowawayPostgres:
    """A private cluster in a temp dir on its own port: stopping it disturbs nothing else."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="prospect-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_pg([pg_bin("initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
                     "--auth=trust", "-E", "UTF8"])
        self.start()
        self._as_pg([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                     "postgres", "prospect"])
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/prospect"

    def _as_pg(self, argv: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                       capture_output=True)

    def start(self) -> None:
        self._as_pg([pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-w", "-l",
                     str(self.dir / "log"), "-o", f"-p {self.port} -k {self.dir} "
                     "-c listen_addresses=127.0.0.1", "start"])

    def stop(self) -> None:
        self._as_pg([pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-w", "-m", "fast",
                     "stop"])

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def fresh_database() -> str:
    """A new database on the machine's Postgres (for scenarios that do not stop Postgres)."""
    import psycopg

    name = f"prospect_fault_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class ThrowawayRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError("redis did not start")

    def kill(self) -> None:
        """SIGKILL: whatever it held in memory is gone, as after a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()


def prepare(settings: Settings) -> dict[str, str]:
    return migrate_with_keys(settings, "fault")


def env_for(settings: Settings) -> dict[str, str]:
    from worker.job_supervisor import settings_env

    return {**os.environ, **settings_env(settings), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


class Proc:
    """A process in its own group, so a kill takes all its children too."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.argv = argv
        self.env = env
        self.p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=open(log, "ab"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def killpg(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start_api(settings: Settings, port: int, log: Path, workers: int = 2) -> Proc:
    proc = Proc([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port",
                 str(port), "--workers", str(workers)], env_for(settings), log)
    wait_http(f"http://127.0.0.1:{port}/healthz", 60)
    return proc


def wait_until(pred: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class LoadStats:
    requests: int = 0
    acknowledged: set[str] = field(default_factory=set)
    statuses: dict[int, int] = field(default_factory=dict)
    connection_errors: int = 0
    retries: int = 0
    retry_after_seen: int = 0
    server_errors: int = 0
    latencies: list[float] = field(default_factory=list)


async def retrying_load(base: str, key: str, seconds: float, concurrency: int = 8,
                        batch: int = 20, tag: str | None = None) -> LoadStats:
    """Clients that post single events and batches and retry each request, with the same
    event ids, until the API acknowledges it (2xx). Honors Retry-After."""
    stats = LoadStats()
    tag = tag or secrets.token_hex(3)
    stop_at = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {key}"}

    async def client(n: int) -> None:
        seq = 0
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as http:
            while time.monotonic() < stop_at:
                seq += 1
                size = 1 if seq % 2 else batch
                events = [{"event_id": f"{tag}-{n}-{seq}-{i}", "prompt": f"q {seq} {i}",
                           "completion": "a", "label": "up" if i % 3 else "down",
                           "model_version": "v1", "user_id": f"u{n}"} for i in range(size)]
                path, body = (("/v1/feedback", events[0]) if size == 1
                              else ("/v1/feedback/batch", {"events": events}))
                while True:
                    stats.requests += 1
                    t = time.monotonic()
                    try:
                        r = await http.post(path, json=body)
                    except httpx.HTTPError:
                        stats.connection_errors += 1
                        stats.retries += 1
                        await asyncio.sleep(0.3)
                        continue
                    stats.latencies.append(time.monotonic() - t)
                    stats.statuses[r.status_code] = stats.statuses.get(r.status_code, 0) + 1
                    if r.status_code >= 500 and r.status_code != 503:
                        stats.server_errors += 1
                    if r.status_code < 300:
                        if size == 1:
                            stats.acknowledged.add(events[0]["event_id"])
                        else:
                            for item in r.json()["results"]:
                                if item["status"] in ("accepted", "duplicate"):
                                    stats.acknowledged.add(item["event_id"])
                        break
                    if r.status_code == 503:
                        stats.retry_after_seen += "retry-after" in r.headers
                    stats.retries += 1
                    await asyncio.sleep(min(1.0, float(r.headers.get("retry-after", "0.3"))))

    await asyncio.gather(*(client(n) for n in range(concurrency)))
    return stats


def stored_event_ids(url: str) -> tuple[int, set[str]]:
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT event_id FROM feedback_events").fetchall()
    ids = [r[0] for r in rows]
    return len(ids), set(ids)


def toy_model(path: Path) -> Path:
    from worker.kto import toy

    return toy.make_toy_folder(path, seed=0)


def table(title: str, rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"## {title}"] + [f"  {k.ljust(width)}  {v}" for k, v in rows])
