"""Sustained load: a steady mix of single and batch ingestion plus dashboard reads, for minutes.

Starts the API as in production (`prospect serve`: gunicorn + uvicorn workers) on a throw-away
Postgres database and drives it from a bounded asyncio client on loopback at a fixed request
rate (open loop: requests are sent on schedule, not when the previous one returns, so a slow
server shows up as latency, not as a lower offered rate). Reports requests/s held, p50/p99 per
kind, errors, and the API's memory (RSS of the gunicorn master and workers) after warm-up and
at the end.

    .venv/bin/python bench/load.py [--seconds 180] [--rate 150] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import signal
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.faults.common import (  # noqa: E402
    drop_database,
    free_port,
    fresh_database,
    prepare,
    start_api,
)
from service.settings import Settings  # noqa: E402

#: Share of each kind of request in the mix.
#: Dashboards poll (every 15 s per open page), frontends post: reads are a small share, and
#: the balance queries scan the window, so they are the expensive part.
MIX = (("single", 0.74), ("batch", 0.20), ("dashboard", 0.02), ("balance", 0.02),
       ("jobs", 0.02))


def rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants (gunicorn master + workers)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return total / 1024


async def login(http: httpx.AsyncClient, key: str) -> None:
    page = await http.get("/dashboard/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, "login form without a CSRF token"
    r = await http.post("/dashboard/login", data={"key": key, "csrf_token": token.group(1),
                                                  "next": "/dashboard"})
    assert r.status_code in (200, 303), r.status_code


async def drive(base: str, keys: dict[str, str], seconds: float, rate: float,
                concurrency: int) -> tuple[dict[str, list[float]], dict[str, int], int]:
    lat: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    ingest = httpx.AsyncClient(base_url=base, limits=limits, timeout=10,
                               headers={"Authorization": f"Bearer {keys['ingest']}"})
    reader = httpx.AsyncClient(base_url=base, limits=limits, timeout=10,
                               headers={"Authorization": f"Bearer {keys['read']}"})
    dash = httpx.AsyncClient(base_url=base, limits=limits, timeout=10, follow_redirects=False)
    await login(dash, keys["read"])
    sem = asyncio.Semaphore(concurrency)
    tag = secrets.token_hex(3)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    import random

    rng = random.Random(0)
    n = 0

    async def one(kind: str, i: int) -> None:
        async with sem:
            t = time.perf_counter()
            try:
                if kind == "single":
                    r = await ingest.post("/v1/feedback", json={
                        "event_id": f"{tag}-{i}", "prompt": f"question {i}",
                        "completion": "answer " * 40, "label": "up" if i % 4 else "down",
                        "model_version": "v1", "user_id": f"u{i % 500}"})
                elif kind == "batch":
                    r = await ingest.post("/v1/feedback/batch", json={"events": [{
                        "event_id": f"{tag}-{i}-{j}", "prompt": f"q {i} {j}",
                        "completion": "answer " * 40, "label": "up" if j % 4 else "down",
                        "model_version": "v1", "user_id": f"u{j}"} for j in range(20)]})
                elif kind == "dashboard":
                    r = await dash.get("/dashboard" if i % 2 else "/dashboard/api/balance")
                elif kind == "balance":
                    r = await reader.get("/v1/balance")
                else:
                    r = await reader.get("/v1/jobs", params={"limit": 20})
                ok = r.status_code < 400
            except httpx.HTTPError:
                ok = False
            lat[kind].append(time.perf_counter() - t)
            if not ok:
                errors[kind] += 1

    tasks = []
    start = time.perf_counter()
    while (now := time.perf_counter() - start) < seconds:
        target = int(now * rate)
        while n < target:
            n += 1
            tasks.append(asyncio.create_task(one(rng.choices(kinds, weights)[0], n)))
        await asyncio.sleep(0.002)
        if len(tasks) > 5000:
            tasks = [t for t in tasks if not t.done()]
    # Stragglers get a short grace, then count as errors (a server that fell behind).
    pending = [t for t in tasks if not t.done()]
    late: set[asyncio.Task[None]] = set()
    if pending:
        _, late = await asyncio.wait(pending, timeout=15)
    for t in late:
        t.cancel()
    errors["timeout"] += len(late)
    for c in (ingest, reader, dash):
        await c.aclose()
    return lat, errors, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--warmup", type=float, default=15)
    ap.add_argument("--rate", type=float, default=150, help="requests per second offered")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    url = fresh_database()
    api = None
    try:
        settings = Settings(database_url=url, user_id_key="load-user-id-key-0123456789",
                            dashboard_cookie_secure=False, log_format="json",
                            log_level="WARNING")
        keys = prepare(settings)
        port = free_port()
        log = Path(f"/tmp/prospect-load-{port}.log")
        api = start_api(settings, port, log, workers=args.workers)
        base = f"http://127.0.0.1:{port}"
        asyncio.run(drive(base, keys, args.warmup, args.rate, args.concurrency))
        mem_before = rss_mib(api.p.pid)
        t = time.perf_counter()
        lat, errors, n = asyncio.run(drive(base, keys, args.seconds, args.rate,
                                           args.concurrency))
        elapsed = time.perf_counter() - t
        mem_after = rss_mib(api.p.pid)
    finally:
        if api is not None:
            api.killpg(signal.SIGTERM)
        drop_database(url)
    total = sum(len(v) for v in lat.values())
    print(f"\nLoad: {args.seconds:.0f} s at {args.rate:.0f} req/s offered, "
          f"{args.workers} API workers, concurrency cap {args.concurrency}")
    print(f"{'kind':<10} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, _ in MIX:
        v = lat.get(kind, [])
        q = statistics.quantiles(v, n=100) if len(v) > 1 else [0.0] * 99
        print(f"{kind:<10} {len(v):>9} {errors.get(kind, 0):>7} {q[49] * 1000:>8.1f} "
              f"{q[98] * 1000:>8.1f}")
    allq = statistics.quantiles([x for v in lat.values() for x in v], n=100)
    print(f"{'all':<10} {total:>9} {sum(errors.values()):>7} {allq[49] * 1000:>8.1f} "
          f"{allq[98] * 1000:>8.1f}")
    print(f"held {total / elapsed:.1f} req/s ({n} sent); API RSS after warm-up "
          f"{mem_before:.0f} MiB, at the end {mem_after:.0f} MiB "
          f"({mem_after - mem_before:+.0f} MiB)")
    print(f"rerun: .venv/bin/python bench/load.py --seconds {args.seconds:.0f} "
          f"--rate {args.rate:.0f} --workers {args.workers}")
    return 0 if not sum(errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
