"""N parallel clients retrying the same events over real HTTP against the multi-process
production server: exactly one row and exactly one 'accepted' per event_id."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import func, select

from service.models import feedback_events
from tests.service.helpers import event

CLIENTS = 6
ROUNDS = 2


def _serve(url: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PROSPECT_DATABASE_URL": url,
           "PROSPECT_USER_ID_KEY": "test-user-id-key-0123456789"}
    proc = subprocess.Popen(
        # The production server: `prospect serve` (gunicorn + 2 uvicorn workers).
        [sys.executable, "-m", "service.cli", "serve", "--workers", "2", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def test_parallel_retries_store_each_event_once(env):
    env.clear()
    events = [event(event_id=f"conc-{env.backend}-{i}") for i in range(40)]
    proc, base = _serve(env.url)
    try:
        def client(seed: int) -> list[tuple[str, int, str]]:
            rng = random.Random(seed)
            seen = []
            with httpx.Client(base_url=base, headers=env.headers("ingest"), timeout=30) as c:
                for _ in range(ROUNDS):
                    batch = rng.sample(events, len(events))
                    r = c.post("/v1/feedback/batch", json={"events": batch[:25]})
                    seen += [(x["event_id"], r.status_code, x["status"])
                             for x in r.json()["results"]]
                    for ev in batch[25:]:
                        r = c.post("/v1/feedback", json=ev)
                        seen.append((ev["event_id"], r.status_code, r.json().get("status")))
            return seen

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [x for chunk in pool.map(client, range(CLIENTS)) for x in chunk]
    finally:
        proc.terminate()
        proc.wait(timeout=15)

    assert all(code in (200, 201, 207) for _, code, _ in results), Counter(c for _, c, _ in results)
    accepted = Counter(eid for eid, _, status in results if status == "accepted")
    assert accepted == Counter({ev["event_id"]: 1 for ev in events})
    assert {status for _, _, status in results} == {"accepted", "duplicate"}
    with env.app.state.engine.connect() as conn:
        per_id = conn.execute(select(feedback_events.c.event_id, func.count())
                              .group_by(feedback_events.c.event_id)).all()
    assert len(per_id) == len(events) and all(n == 1 for _, n in per_id)
