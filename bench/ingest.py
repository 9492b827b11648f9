"""Ingestion benchmark: batch POSTs over HTTP vs raw COPY vs executemany INSERT, same rows.

Starts the API with its production server settings (`prospect serve`: gunicorn + uvicorn
workers) on a throw-away Postgres database, posts batches from a separate process, measures
in the same run a raw COPY of the same rows into the same table (the ceiling) and a plain
executemany INSERT ... ON CONFLICT DO NOTHING from Python, then single-event POST latency at a
fixed request rate. Prints a table and the command to rerun it.

    .venv/bin/python bench/ingest.py [--events 60000] [--rate 300] ...
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service import migrate  # noqa: E402
from service.auth import create_key  # noqa: E402
from service.db import make_engine, make_sessionmaker  # noqa: E402
from service.ingest import to_row  # noqa: E402
from service.schemas import input_models  # noqa: E402
from service.settings import Settings  # noqa: E402

COLS = ("event_id", "payload_hash", "prompt", "completion", "desirable", "model_version",
        "user_hash", "session_id", "source", "environment", "trace_id", "request_id",
        "replaces", "correction", "comment", "metadata", "occurred_at", "received_at")


def make_events(n: int, tag: str) -> list[dict[str, Any]]:
    """~1.4 KB rows: a chat prompt, a ~700-character answer, ids and small metadata."""
    filler = "The quick brown fox jumps over the lazy dog. " * 16
    now = datetime.now(UTC).isoformat()
    return [{
        "event_id": f"{tag}-{i:08d}-{secrets.token_hex(4)}",
        "prompt": [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": f"Question {i}: " + filler[:300]}],
        "completion": f"Answer {i}: " + filler[:700],
        "label": "up" if i % 3 else "down",
        "model_version": f"ckpt-{i % 4}",
        "user_id": f"user-{i % 997}",
        "session_id": f"sess-{i % 5000}",
        "source": "web",
        "trace_id": secrets.token_hex(8),
        "metadata": {"ui": "thumbs", "latency_ms": i % 900, "locale": "en-US"},
        "occurred_at": now,
    } for i in range(n)]


def stored_rows(events: list[dict[str, Any]], settings: Settings) -> list[tuple[Any, ...]]:
    """The exact rows the API would store (same hashing, same normalisation)."""
    model = input_models(settings)["FeedbackIn"]
    now = datetime.now(UTC)
    out = []
    for ev in events:
        row = to_row(model.model_validate(ev), settings, now)
        row["prompt"] = orjson.dumps(row["prompt"]).decode()
        row["metadata"] = orjson.dumps(row["metadata"]).decode() if row["metadata"] else None
        out.append(tuple(row[c] for c in COLS))
    return out


def bench_copy(dsn: str, rows: list[tuple[Any, ...]]) -> float:
    with psycopg.connect(dsn) as conn:
        conn.execute("TRUNCATE feedback_events")
        conn.commit()
        t0 = time.perf_counter()
        with conn.cursor() as cur, cur.copy(
            f"COPY feedback_events ({', '.join(COLS)}) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
        return len(rows) / (time.perf_counter() - t0)


def bench_executemany(dsn: str, rows: list[tuple[Any, ...]], chunk: int) -> float:
    sql = (f"INSERT INTO feedback_events ({', '.join(COLS)}) VALUES "
           f"({', '.join(['%s'] * len(COLS))}) ON CONFLICT (event_id) DO NOTHING")
    with psycopg.connect(dsn) as conn:
        conn.execute("TRUNCATE feedback_events")
        conn.commit()
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            for i in range(0, len(rows), chunk):
                cur.executemany(sql, rows[i:i + chunk])
                conn.commit()
        return len(rows) / (time.perf_counter() - t0)


class _Conn:
    """A keep-alive HTTP/1.1 connection on the stdlib client: far less client CPU per
    request than httpx, so the client process disturbs the measurement less."""

    def __init__(self, base: str, key: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.conn.request("POST", path, body=body, headers=self.headers)
        r = self.conn.getresponse()
        return r.status, r.read()


def _http_client(base: str, key: str, bodies: list[bytes], conns: int, q: mp.Queue) -> None:
    """Runs in its own process: posts pre-encoded batch bodies over `conns` connections."""
    todo = list(enumerate(bodies))
    lock = threading.Lock()
    counts = {"accepted": 0, "other": 0, "errors": 0}

    def worker() -> None:
        c = _Conn(base, key)
        while True:
            with lock:
                if not todo:
                    return
                _, body = todo.pop()
            status, content = c.post("/v1/feedback/batch", body)
            res = orjson.loads(content) if status == 207 else None
            with lock:
                if res is None:
                    counts["errors"] += 1
                else:
                    counts["accepted"] += res["accepted"]
                    counts["other"] += len(res["results"]) - res["accepted"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put((time.perf_counter() - t0, counts))


def _latency_client(base: str, key: str, bodies: list[bytes], rate: float, q: mp.Queue) -> None:
    """Open-loop: request i is due at t0 + i/rate; latency counts from the due time, so a
    slow server cannot hide queueing (no coordinated omission)."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    nthreads = 16
    t0 = time.perf_counter() + 0.2

    def worker(k: int) -> None:
        c = _Conn(base, key)
        for i in range(k, len(bodies), nthreads):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            status, _ = c.post("/v1/feedback", bodies[i])
            done = time.perf_counter()
            with lock:
                lat.append(done - due)
                codes[status] = codes.get(status, 0) + 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put((sorted(lat), codes, time.perf_counter() - t0))


def _in_process(target: Any, *args: Any) -> Any:
    q: mp.Queue = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=target, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=4, help="parallel HTTP connections")
    ap.add_argument("--workers", type=int, default=2, help="API worker processes")
    ap.add_argument("--rate", type=float, default=300.0, help="single-event requests/s")
    ap.add_argument("--duration", type=float, default=10.0, help="latency phase seconds")
    ap.add_argument("--pg-admin-url", default=os.environ.get(
        "PROSPECT_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--keep-db", action="store_true")
    args = ap.parse_args()

    name = f"prospect_bench_{secrets.token_hex(4)}"
    dsn = args.pg_admin_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(args.pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    proc = None
    try:
        settings = Settings(database_url=dsn, user_id_key="bench-user-id-key-0123456789")
        migrate.upgrade(settings)
        engine = make_engine(settings)
        with make_sessionmaker(engine).begin() as s:
            _, key = create_key(s, "ingest", name="bench")
        engine.dispose()

        print(f"preparing {args.events} events ...", flush=True)
        events = make_events(args.events, "b")
        bodies = [orjson.dumps({"events": events[i:i + args.batch_size]})
                  for i in range(0, len(events), args.batch_size)]
        rows = stored_rows(events, settings)
        row_bytes = sum(len(str(v)) for v in rows[0] if v is not None)

        copy_rate = bench_copy(dsn, rows)
        em_rate = bench_executemany(dsn, rows, args.batch_size)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE feedback_events")

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "PROSPECT_DATABASE_URL": dsn,
               "PROSPECT_USER_ID_KEY": settings.user_id_key}
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--workers", str(args.workers)],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("API did not start")
        warm = [orjson.dumps({"events": make_events(50, f"w{i}")}) for i in range(8)]
        _in_process(_http_client, base, key, warm, args.connections)

        elapsed, counts = _in_process(_http_client, base, key, bodies, args.connections)
        http_rate = args.events / elapsed
        assert counts["accepted"] == args.events and counts["errors"] == 0, counts

        n_single = int(args.rate * args.duration)
        singles = [orjson.dumps(e) for e in make_events(n_single, "s")]
        lat, codes, wall = _in_process(_latency_client, base, key, singles, args.rate)
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if not args.keep_db:
            with psycopg.connect(args.pg_admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    cmd = "cd " + shlex.quote(str(ROOT)) + " && .venv/bin/python bench/ingest.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    print()
    print(f"Ingestion benchmark: {args.events} events of ~{row_bytes / 1024:.1f} KB, "
          f"batches of {args.batch_size}, {args.workers} API workers, "
          f"{args.connections} client connections, {os.cpu_count()} CPUs (shared with Postgres)")
    print(f"{'path':<44} {'events/s':>10} {'vs COPY':>8}")
    print("-" * 64)
    for label, rate in (("COPY (ceiling)", copy_rate),
                        ("executemany INSERT ON CONFLICT DO NOTHING", em_rate),
                        ("HTTP POST /v1/feedback/batch", http_rate)):
        print(f"{label:<44} {rate:>10,.0f} {rate / copy_rate:>7.0%}")
    print()
    print(f"single-event POST /v1/feedback at {args.rate:.0f} req/s for {args.duration:.0f} s "
          f"({len(lat)} requests, achieved {len(lat) / wall:.0f} req/s): "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {lat[-1] * 1000:.1f} ms; status {codes}")
    print(f"\nrerun: {cmd}")


if __name__ == "__main__":
    main()
