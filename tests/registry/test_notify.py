"""Webhooks against a real local HTTP server: delivered with retries and backoff, signed,
written in the same transaction as the change they report, never twice for one fact."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select, update

from service import notify, registry
from service.models import notifications
from service.settings import Settings


class Receiver:
    """A webhook receiver that answers 500 to the first ``fail_first`` requests."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"headers": dict(self.headers), "body": body})
                code = 500 if len(outer.requests) <= outer.fail_first else 204
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _rows(reg, ids) -> list:
    """The outbox rows with these ids."""
    with reg.engine.connect() as conn:
        return list(conn.execute(select(notifications).where(
            notifications.c.id.in_(list(ids)))).mappings().all())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.close()


@pytest.fixture
def hooked(reg, receiver):
    """reg's settings with the webhook on; leftover rows are closed after the test so no other
    test's sweep posts them."""
    s = reg.settings.model_copy(update={"webhook_url": receiver.url,
                                        "webhook_secret": "s3cret-signing-key",
                                        "webhook_backoff_s": 0.0,
                                        "webhook_max_attempts": 4})
    yield s
    with reg.engine.begin() as conn:
        conn.execute(update(notifications).where(notifications.c.status == "pending")
                     .values(status="failed"))


def test_promotion_is_delivered_with_retries_and_signed(reg, receiver, hooked):
    a = reg.candidate()
    registry.promote(reg.engine, hooked, a["id"], "production", None, registry.Actor.key(7),
                     reason="ship it")
    reports = [notify.deliver_pending(reg.engine, hooked) for _ in range(3)]
    assert [len(r.retrying) for r in reports] == [1, 1, 0]
    assert len(reports[2].sent) == 1
    assert len(receiver.requests) == 3
    req = receiver.requests[-1]
    body = json.loads(req["body"])
    assert body["event"] == "promoted" and body["checkpoint_id"] == a["id"]
    assert body["model_version"] == a["model_version"] and body["actor"] == "key:7"
    assert body["reason"] == "ship it" and body["previous"] == f"{reg.line}-base"
    assert req["headers"]["X-Prospect-Event"] == "promoted"
    assert req["headers"]["X-Prospect-Signature"] == notify.sign("s3cret-signing-key",
                                                                 req["body"])
    # the same delivery id on every retry, so the receiver can drop duplicates
    assert len({r["headers"]["X-Prospect-Delivery"] for r in receiver.requests}) == 1
    [row] = _rows(reg, [reports[2].sent[0]])
    assert row["status"] == "sent" and row["attempts"] == 3
    # nothing left to send
    assert not notify.deliver_pending(reg.engine, hooked).sent


def test_backoff_and_giving_up(reg, hooked):
    dead = hooked.model_copy(update={"webhook_url": "http://127.0.0.1:9/unreachable",
                                     "webhook_backoff_s": 10.0, "webhook_timeout_s": 1.0})
    a = reg.candidate()
    registry.promote(reg.engine, dead, a["id"], "production", None, registry.Actor.key(1))
    registry.rollback(reg.engine, dead, reg.line, registry.Actor.key(1), reason="oops")
    t0 = datetime.now(UTC)
    first = notify.deliver_pending(reg.engine, dead, now=t0)
    assert len(first.retrying) == 2
    # not due again before the backoff (10 s, then 20 s, 40 s)
    assert not notify.deliver_pending(reg.engine, dead, now=t0 + timedelta(seconds=5)).retrying
    t = t0
    for wait in (10, 20, 40):
        t = t + timedelta(seconds=wait + 1)
        last = notify.deliver_pending(reg.engine, dead, now=t)
    assert len(last.failed) == 2
    rows = _rows(reg, last.failed)
    assert {r["status"] for r in rows} == {"failed"} and {r["attempts"] for r in rows} == {4}
    assert "ConnectionRefused" in rows[0]["last_error"] or "URLError" in rows[0]["last_error"]
    assert {r["event"] for r in rows} == {"promoted", "rolled_back"}
    r = reg.client.get("/v1/notifications", params={"status": "failed"}, headers=reg.h("read"))
    assert r.status_code == 200 and len(r.json()["notifications"]) >= 2


def test_every_kind_of_change_is_announced_once(reg, receiver, hooked):
    receiver.fail_first = 0
    a, b = reg.candidate(), reg.candidate()  # (gate_passed is not announced: no webhook yet)
    row = registry.ensure_pending(reg.engine, hooked, reg.job())
    registry.record_gate(reg.engine, hooked, row["id"], None, passed=False, metrics={},
                         reason="KL too high")
    registry.promote(reg.engine, hooked, a["id"], "production", None, registry.Actor.key(1))
    registry.promote(reg.engine, hooked, b["id"], "canary", 5.0, registry.Actor.key(1))
    registry.rollback(reg.engine, hooked, reg.line, registry.Actor.key(1), "canary", "worse")
    failed_job = reg.job(status="failed", final_dir=None)
    assert notify.enqueue_job_failures(reg.engine, hooked) >= 1
    assert notify.enqueue_job_failures(reg.engine, hooked) == 0  # once per job
    notify.deliver_pending(reg.engine, hooked)
    mine = [json.loads(r["body"]) for r in receiver.requests]
    mine = [m for m in mine if m.get("line") == reg.line]
    assert [m["event"] for m in mine] == ["gate_rejected", "promoted", "canary_started",
                                          "rolled_back", "job_failed"]
    assert mine[0]["reason"] == "KL too high" and mine[-1]["job_id"] == failed_job


def test_a_change_that_rolls_back_announces_nothing(reg, hooked):
    a = reg.candidate()
    registry.promote(reg.engine, hooked, a["id"], "production", None, registry.Actor.key(1))
    with reg.engine.connect() as conn:
        n0 = len(notify.list_notifications(conn, None, 10_000))
    with pytest.raises(Exception):  # noqa: B017 - a 409
        registry.promote(reg.engine, hooked, a["id"], "production", None, registry.Actor.key(1))
    with reg.engine.connect() as conn:
        assert len(notify.list_notifications(conn, None, 10_000)) == n0


def test_no_webhook_writes_nothing(reg):
    a = reg.candidate()
    registry.promote(reg.engine, reg.settings, a["id"], "production", None,
                     registry.Actor.key(1))
    with reg.engine.connect() as conn:
        rows = notify.list_notifications(conn, None, 10_000)
    assert not [r for r in rows if r["payload"].get("line") == reg.line]
    assert not notify.deliver_pending(reg.engine, reg.settings).sent


class SlowReceiver:
    """A receiver that accepts the request and answers nothing for ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                outer.hits += 1
                time.sleep(delay)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_backoff_counts_from_the_failed_attempt_not_the_sweep_start(reg, hooked):
    """Each row's retry time was sweep start + backoff: in a sweep slowed by timing-out
    receivers, the later rows' retries were already due when the sweep ended (no backoff at
    all), and their 60 s leases likewise could expire before they were even posted."""
    slow = SlowReceiver(delay=1.5)
    try:
        s = hooked.model_copy(update={"webhook_url": slow.url, "webhook_timeout_s": 0.5,
                                      "webhook_backoff_s": 1.25})
        a, b = reg.candidate(), reg.candidate()
        registry.promote(reg.engine, s, a["id"], "production", None, registry.Actor.key(1))
        registry.promote(reg.engine, s, b["id"], "canary", 5.0, registry.Actor.key(1))
        registry.rollback(reg.engine, s, reg.line, registry.Actor.key(1), "canary", "worse")
        first = notify.deliver_pending(reg.engine, s)
        assert len(first.retrying) == 3  # each timed out after 0.5 s: the sweep took > 1.5 s
        again = notify.deliver_pending(reg.engine, s)
        assert again.retrying == [] and slow.hits == 3
    finally:
        slow.close()


def test_a_receiver_trickling_its_answer_is_cut_off_at_the_timeout(reg, hooked):
    """urllib's timeout bounds each socket read, not the request: a receiver sending its
    answer a byte at a time held the deliverer for as long as it liked (past its lease)."""
    srv = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def trickle() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            for ch in b"HTTP/1.1 204 No Content\r\nX-Slow: yes\r\n\r\n":
                if done.wait(0.2):
                    return
                conn.send(bytes([ch]))

    threading.Thread(target=trickle, daemon=True).start()
    s = hooked.model_copy(update={"webhook_url": f"http://127.0.0.1:{srv.getsockname()[1]}/",
                                  "webhook_timeout_s": 0.5})
    try:
        a = reg.candidate()
        registry.promote(reg.engine, s, a["id"], "production", None, registry.Actor.key(1))
        t0 = time.monotonic()
        report = notify.deliver_pending(reg.engine, s)
        took = time.monotonic() - t0
    finally:
        done.set()
        srv.close()
    assert len(report.retrying) == 1 and not report.sent
    assert took < 2.5, took
    [row] = _rows(reg, [report.retrying[0]])
    assert "Timeout" in row["last_error"]


def test_a_receiver_answering_garbage_is_a_failed_attempt(reg, hooked):
    """A non-HTTP answer raises http.client.BadStatusLine, neither OSError nor ValueError: it
    escaped deliver_pending, so the attempt was never counted (retried forever, never
    ``failed``) and the rows after it in the sweep were not posted."""
    srv = socket.create_server(("127.0.0.1", 0))

    def garbage() -> None:
        for _ in range(2):
            conn, _ = srv.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HELLO\r\n\r\n")

    threading.Thread(target=garbage, daemon=True).start()
    s = hooked.model_copy(update={"webhook_url": f"http://127.0.0.1:{srv.getsockname()[1]}/",
                                  "webhook_max_attempts": 1})
    try:
        a = reg.candidate()
        registry.promote(reg.engine, s, a["id"], "production", None, registry.Actor.key(1))
        registry.rollback(reg.engine, s, reg.line, registry.Actor.key(1), reason="oops")
        report = notify.deliver_pending(reg.engine, s)
    finally:
        srv.close()
    assert len(report.failed) == 2
    rows = _rows(reg, report.failed)
    assert {r["attempts"] for r in rows} == {1}
    assert all("BadStatusLine" in r["last_error"] for r in rows)


@pytest.mark.parametrize("url", ["hooks.example.com/T0/token", "ftp://hooks.example.com/x",
                                 "file:///etc/passwd", "http:///no-host"])
def test_a_webhook_url_urllib_cannot_post_to_is_refused_at_startup(url):
    """Without a scheme urllib raised ValueError before the try, out of deliver_pending: the
    attempt was never counted, so every sweep failed on the same row forever."""
    with pytest.raises(ValidationError, match="webhook_url"):
        Settings(webhook_url=url)
    assert Settings(webhook_url=" https://hooks.example.com/x ").webhook_url == \
        "https://hooks.example.com/x"
    assert Settings(webhook_url="none").webhook_url is None


def test_a_redirect_is_not_followed_as_a_bodyless_get(reg, hooked):
    """urllib follows a 301/302/303 to a POST with a GET that has no body: a moved receiver
    answering that GET with 200 got the notification marked ``sent`` although its body never
    arrived (and the signature and delivery headers went to wherever Location pointed)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            seen.append(f"POST {self.path}")
            self.send_response(302)
            self.send_header("Location", "/landing")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(f"GET {self.path}")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    s = hooked.model_copy(update={
        "webhook_url": f"http://127.0.0.1:{server.server_address[1]}/hook"})
    try:
        a = reg.candidate()
        registry.promote(reg.engine, s, a["id"], "production", None, registry.Actor.key(1))
        report = notify.deliver_pending(reg.engine, s)
    finally:
        server.shutdown()
        server.server_close()
    assert not report.sent and len(report.retrying) == 1
    assert seen == ["POST /hook"]
    [row] = _rows(reg, [report.retrying[0]])
    assert row["last_error"].startswith("HTTP 302")


def test_an_unexpected_error_in_a_post_is_a_failed_attempt_named_as_itself(reg, hooked, monkeypatch):
    """Not every failure is a timeout: the attempt records what went wrong."""
    def broken(*_a, **_k):
        raise RuntimeError("proxy handler exploded")

    monkeypatch.setattr(notify._opener, "open", broken)
    s = hooked.model_copy(update={"webhook_max_attempts": 1})
    a = reg.candidate()
    registry.promote(reg.engine, s, a["id"], "production", None, registry.Actor.key(1))
    report = notify.deliver_pending(reg.engine, s)
    assert report.failed
    rows = _rows(reg, report.failed)
    assert all(r["last_error"] == "RuntimeError: proxy handler exploded" for r in rows), rows


def test_a_webhook_timeout_past_the_lease_is_refused_at_startup():
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="webhook_timeout_s"):
        Settings(webhook_timeout_s=120)


# ---- pruning the outbox: settled rows past PROSPECT_WEBHOOK_KEEP_DAYS go, pending rows stay

def _outbox_row(reg, status: str, age_days: float, tag: str) -> int:
    """An outbox row whose last attempt (``next_attempt_at``) was ``age_days`` ago."""
    import secrets

    at = datetime.now(UTC) - timedelta(days=age_days)
    with reg.engine.begin() as conn:
        return conn.execute(notifications.insert().values(
            dedup_key=f"prune-test:{tag}:{secrets.token_hex(6)}", event="promoted",
            payload={"event": "promoted", "line": reg.line}, status=status,
            attempts=0 if status == "pending" else 1, next_attempt_at=at,
            created_at=at - timedelta(minutes=1),
            sent_at=at if status == "sent" else None).returning(notifications.c.id)).scalar_one()


def _existing(reg, ids) -> set[int]:
    return {r["id"] for r in _rows(reg, ids)}


@pytest.fixture
def outbox_ids(reg) -> Iterator[list[int]]:
    """Rows a test adds; removed afterwards so no other test's sweep posts or counts them."""
    ids: list[int] = []
    yield ids
    with reg.engine.begin() as conn:
        conn.execute(notifications.delete().where(notifications.c.id.in_(ids)))


def test_prune_removes_old_sent_and_failed_rows_and_keeps_recent_and_pending(reg, outbox_ids):
    s = reg.settings.model_copy(update={"webhook_keep_days": 30.0})
    notify.prune(reg.engine, s)  # whatever earlier tests left that is already old
    old_sent = _outbox_row(reg, "sent", 31, "old-sent")
    old_failed = _outbox_row(reg, "failed", 45, "old-failed")
    recent_sent = _outbox_row(reg, "sent", 29, "recent-sent")
    recent_failed = _outbox_row(reg, "failed", 1, "recent-failed")
    # pending for months (a receiver down, a long backoff): still owed a delivery
    old_pending = _outbox_row(reg, "pending", 90, "old-pending")
    ids = [old_sent, old_failed, recent_sent, recent_failed, old_pending]
    outbox_ids.extend(ids)
    assert notify.prune(reg.engine, s) == 2
    assert _existing(reg, ids) == {recent_sent, recent_failed, old_pending}
    assert notify.prune(reg.engine, s) == 0
    # the API lists what is left
    r = reg.client.get("/v1/notifications", params={"limit": 1000}, headers=reg.h("read"))
    assert r.status_code == 200, r.text
    listed = {n["id"] for n in r.json()["notifications"]}
    assert {recent_sent, recent_failed, old_pending} <= listed
    assert not {old_sent, old_failed} & listed


def test_prune_with_keep_days_0_keeps_everything(reg, outbox_ids):
    s = reg.settings.model_copy(update={"webhook_keep_days": 0.0})
    ids = [_outbox_row(reg, "sent", 3000, "ancient-sent"),
           _outbox_row(reg, "failed", 3000, "ancient-failed")]
    outbox_ids.extend(ids)
    assert notify.prune(reg.engine, s) == 0
    assert _existing(reg, ids) == set(ids)


def test_prune_deletes_in_bounded_batches(reg, outbox_ids):
    """A large backlog is deleted a batch per transaction, not in one long one."""
    from sqlalchemy import event as sa_event

    s = reg.settings.model_copy(update={"webhook_keep_days": 30.0})
    notify.prune(reg.engine, s)
    ids = [_outbox_row(reg, "sent" if i % 2 else "failed", 40, f"batch-{i}") for i in range(5)]
    keep = _outbox_row(reg, "pending", 40, "batch-pending")
    outbox_ids.extend([*ids, keep])
    deletes: list[int] = []

    def count(conn, cursor, statement, *_a) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(cursor.rowcount)

    sa_event.listen(reg.engine, "after_cursor_execute", count)
    try:
        assert notify.prune(reg.engine, s, batch_size=2) == 5
    finally:
        sa_event.remove(reg.engine, "after_cursor_execute", count)
    assert deletes == [2, 2, 1]
    assert _existing(reg, [*ids, keep]) == {keep}


@pytest.mark.parametrize("days", [-1, 0.5, 0.999, 1e9])
def test_an_invalid_webhook_keep_days_is_refused_at_startup(days, monkeypatch):
    """Below a day the job-failure sweep (which looks back a day) would find a failure whose
    row was pruned and announce it again."""
    with pytest.raises(ValidationError, match="webhook_keep_days"):
        Settings(webhook_keep_days=days)
    monkeypatch.setenv("PROSPECT_WEBHOOK_KEEP_DAYS", str(days))
    with pytest.raises(ValidationError, match="webhook_keep_days"):
        Settings()


def test_webhook_keep_days_default_and_bounds():
    assert Settings().webhook_keep_days == 30.0
    assert Settings(webhook_keep_days=0).webhook_keep_days == 0.0
    assert Settings(webhook_keep_days=1).webhook_keep_days == 1.0


def test_a_pruned_job_failure_is_not_announced_again(reg, hooked, receiver):
    """The shortest keep (a day) still outlives the job-failure sweep's lookback: a failure's
    row pruned at the earliest moment is past the lookback too, so it is not queued again."""
    receiver.fail_first = 0
    s = hooked.model_copy(update={"webhook_keep_days": 1.0})
    job_id = reg.job(status="failed", final_dir=None)
    assert notify.enqueue_job_failures(reg.engine, s) >= 1
    notify.deliver_pending(reg.engine, s)
    later = datetime.now(UTC) + timedelta(days=1, minutes=2)
    assert notify.prune(reg.engine, s, now=later) >= 1
    with reg.engine.connect() as conn:
        left = notify.list_notifications(conn, None, 10_000)
    assert not [n for n in left if n["dedup_key"] == f"job_failed:{job_id}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(notify, "_now", lambda: later)
        assert notify.enqueue_job_failures(reg.engine, s) == 0


def test_the_readme_names_every_webhook_event():
    """Receivers dispatch on X-Prospect-Event: each event the outbox can send is documented."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert [e for e in notify.EVENTS if f"`{e}`" not in readme] == []
