"""`prospect demo` (preliminary): the ingestion side end to end on the embedded default.

Upgrades a SQLite database under ./var/demo, creates a key, starts the API in a subprocess on
a free port, posts sample feedback over real HTTP (a batch with a duplicate, a conflict and a
bad item), prints the per-item results and /v1/balance, and stops. No servers needed. A later
issue replaces this with the full training loop.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service import migrate
from service.auth import create_key
from service.db import make_engine, make_sessionmaker
from service.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"API exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("API did not become ready")


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(cells[0]), line] + [fmt(r) for r in cells[1:]])


SAMPLES: list[dict[str, Any]] = [
    {"event_id": "demo-1", "prompt": "What is the capital of France?", "completion": "Paris.",
     "label": "up", "model_version": "base-0", "user_id": "u-1", "source": "demo"},
    {"event_id": "demo-2", "prompt": [{"role": "user", "content": "2 + 2?"}],
     "completion": "5", "label": "down", "model_version": "base-0", "user_id": "u-2",
     "source": "demo", "correction": "4"},
    {"event_id": "demo-3", "prompt": "Summarise: the cat sat.", "completion": "A cat sat.",
     "label": True, "model_version": "base-0", "source": "demo"},
]


def run_demo(workdir: str | None = None) -> int:
    root = Path(workdir or "var/demo").resolve()
    root.mkdir(parents=True, exist_ok=True)
    db = root / "demo.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    settings = Settings(database_url=f"sqlite:///{db}")
    migrate.upgrade(settings)
    engine = make_engine(settings)
    with make_sessionmaker(engine).begin() as session:
        _, key = create_key(session, "admin", name="demo")
    engine.dispose()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PROSPECT_DATABASE_URL": settings.database_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    try:
        _wait_ready(base, proc)
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=h, timeout=10) as c:
            print(f"Prospect demo: API on {base}, database {db}\n")
            rows = []
            for ev in SAMPLES:
                r = c.post("/v1/feedback", json=ev)
                rows.append([ev["event_id"], r.status_code, r.json().get("status")])
            print("POST /v1/feedback (one event each)")
            print(_table(rows, ["event_id", "http", "status"]) + "\n")

            batch = [
                SAMPLES[0],  # a retry: duplicate
                {**SAMPLES[2], "label": "down"},  # same id, new payload: conflict
                {"event_id": "demo-4", "prompt": "Translate 'hola'.", "completion": "hello",
                 "label": "up", "model_version": "base-0", "source": "demo"},
                {"event_id": "demo-5", "prompt": "Name a prime.", "completion": "",
                 "label": "up", "model_version": "base-0"},  # bad: empty completion
                {"event_id": "demo-6", "prompt": "Name a prime.", "completion": "9",
                 "label": "sideways", "model_version": "base-0"},  # bad: unknown label
                {"event_id": "demo-7", "prompt": "Summarise: the cat sat.",
                 "completion": "A cat sat.", "label": "down", "model_version": "base-0",
                 "source": "demo", "replaces": "demo-3"},  # the user changed their vote
                {"event_id": "demo-8", "prompt": "Capital of Italy?", "completion": "Milan",
                 "label": "down", "model_version": "base-0", "source": "demo"},
            ]
            r = c.post("/v1/feedback/batch", json={"events": batch})
            body = r.json()
            print(f"POST /v1/feedback/batch -> HTTP {r.status_code}")
            print(_table([[x["index"], x["event_id"], x["status"], x.get("reason", "")]
                          for x in body["results"]], ["#", "event_id", "status", "reason"]))
            print(f"accepted={body['accepted']} duplicate={body['duplicate']} "
                  f"conflict={body['conflict']} rejected={body['rejected']}\n")

            bal = c.get("/v1/balance").json()
            print("GET /v1/balance (only the latest vote on an answer counts)")
            print(_table([[k, v] for k, v in bal.items()], ["field", "value"]) + "\n")
            export = c.get("/v1/feedback/export").text.strip().splitlines()
            print(f"GET /v1/feedback/export -> {len(export)} JSONL lines for TRL, first: "
                  f"{export[0] if export else '-'}")
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
