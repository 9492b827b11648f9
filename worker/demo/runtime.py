"""The embedded runtime: the real API and a real Celery worker as processes, on a SQLite file
and a broker in a SQLite file (kombu's SQLAlchemy transport). No server to install: only URLs
differ from production.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service import migrate
from service.auth import create_key
from service.db import make_engine, make_sessionmaker
from service.queue import make_celery, send
from service.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def embedded_settings(workdir: Path, **overrides: Any) -> Settings:
    workdir = workdir.resolve()
    return Settings(**{
        "database_url": f"sqlite:///{workdir / 'prospect.db'}",
        "broker_url": f"sqla+sqlite:///{workdir / 'broker.db'}",
        "artifacts_root": str(workdir / "artifacts"),
        **overrides,
    })


def settings_env(settings: Settings) -> dict[str, str]:
    from worker.job_supervisor import settings_env as env

    return env(settings)


@dataclass
class Runtime:
    workdir: Path
    settings: Settings
    base_url: str
    keys: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _celery: Any = None

    def client(self, scope: str = "admin") -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60,
                            headers={"Authorization": f"Bearer {self.keys[scope]}"})

    def send(self, task: str, *args: Any, queue: str = "default") -> bool:
        if self._celery is None:
            self._celery = make_celery(self.settings, "prospect-demo")
        return send(self._celery, task, list(args), queue=queue)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.workdir / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"the {name} process exited ({proc.returncode}):\n{tail}")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._celery is not None:
            self._celery.close()


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``url`` answers 200; fails early when ``proc`` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API did not answer {url} within {timeout:.0f}s")


def _wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{path.stem} exited:\n{path.read_text(errors='replace')[-3000:]}")
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{path.stem} did not start within {timeout:.0f}s")


def migrate_with_keys(settings: Settings, name: str) -> dict[str, str]:
    """Migrate the database and create one key per scope (the secrets are returned)."""
    migrate.upgrade(settings)
    engine = make_engine(settings)
    keys = {}
    with make_sessionmaker(engine).begin() as session:
        for scope in ("ingest", "read", "admin"):
            keys[scope] = create_key(session, scope, name=f"{name}-{scope}")[1]
    engine.dispose()
    return keys


def start(workdir: Path, settings: Settings, port: int | None = None,
          host: str = "127.0.0.1") -> Runtime:
    """Migrate, create keys, start the API (uvicorn) and one worker for both queues."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    keys = migrate_with_keys(settings, "demo")
    port = port or free_port()
    env = {**os.environ, **settings_env(settings), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    rt = Runtime(workdir, settings, f"http://{host}:{port}", keys)
    try:
        rt.procs["api"] = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
             "--host", host, "--port", str(port), "--log-level", "warning"],
            env=env, stdout=open(logs / "api.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        rt.procs["worker"] = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--queues", "gpu,default",
             "--pool", "solo", "--name", f"demo-{os.getpid()}@%h"],
            env=env, stdout=open(logs / "worker.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        wait_http(f"{rt.base_url}/readyz", 60, rt.procs["api"])
        _wait_log(logs / "worker.log", "ready.", rt.procs["worker"], 90)
    except BaseException:
        rt.close()
        raise
    return rt
