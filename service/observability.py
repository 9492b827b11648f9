"""Prometheus metrics, the request-id/latency middleware, and the /metrics route.

Two kinds of metrics, kept apart on purpose:

* **Process metrics** (counters, histograms) live in this module's registry and count what
  this process saw: feedback outcomes, request latency.
* **Database metrics** (jobs by status, job durations, running jobs' step and tokens/s,
  broker queue depth) are computed from Postgres/SQLite and the broker *on scrape* by
  :class:`StateCollector`. The database is the source of truth for job state, so every API
  process reports the same numbers and nothing is double counted or lost on restart.

gunicorn runs several worker processes; a scrape reaches one of them. Without more, the
process metrics would be that one worker's share and would jump between scrapes. The
choice: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable folder (wiped before each
server start, e.g. a tmpfs) and prometheus-client's multiprocess mode writes every worker's
counters and histograms to memory-mapped files there; /metrics then sums all workers with
``MultiProcessCollector``. The database metrics need no such mode (they are not
per-process), so they stay plain collector output. Without the variable (one process: the
tests, ``uvicorn``, the demo) the in-process registry is served as it is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from fastapi import Request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Match

from service.errors import ApiError
from service.logging_setup import request_id_var
from service.models import JOB_STATUSES
from service.models import job_metrics as jm
from service.models import training_jobs as tj
from service.queue import DEFAULT_QUEUE, GPU_QUEUE
from service.settings import Settings

T = TypeVar("T")
log = logging.getLogger("prospect.access")
slog = logging.getLogger("prospect.metrics")

#: Process-local registry (multiprocess mode reads the files instead, see the docstring).
PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)

FEEDBACK_EVENTS = Counter(
    "prospect_feedback_events", "Feedback events by outcome (accepted, duplicate, conflict, "
    "rejected) and, for rejections and conflicts, the field at fault.",
    ["outcome", "reason"], registry=PROCESS_REGISTRY)
FEEDBACK_REQUESTS_REJECTED = Counter(
    "prospect_feedback_requests_rejected", "Ingestion requests rejected as a whole (bad JSON, "
    "wrong body shape, batch too large), by error code.", ["error"], registry=PROCESS_REGISTRY)
REQUEST_LATENCY = Histogram(
    "prospect_http_request_duration_seconds", "Request latency by route template and status.",
    ["method", "route", "status"], registry=PROCESS_REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))

#: The top-level fields a rejection may name; anything else is "unknown_field" so a client
#: sending junk field names cannot blow up the label cardinality.
_REASON_FIELDS = frozenset({
    "body", "event", "event_id", "prompt", "completion", "label", "model_version", "user_id",
    "session_id", "source", "environment", "trace_id", "request_id", "replaces", "correction",
    "comment", "metadata", "occurred_at", "chosen", "rejected", "pair"})


def reason_label(errors: list[dict[str, str]] | None) -> str:
    """The first error's top-level field ("prompt[2].content" -> "prompt")."""
    if not errors:
        return "unknown"
    field = str(errors[0].get("field", ""))
    top = field.split(".", 1)[0].split("[", 1)[0]
    return top if top in _REASON_FIELDS else "unknown_field"


#: Set once a request's per-event outcomes were counted, so a later ApiError of the same
#: request (a single event's 422/409) is not also counted as a whole-request rejection.
_outcomes_counted: ContextVar[bool] = ContextVar("prospect_outcomes_counted", default=False)


def record_outcomes(outcomes: Iterable[Any]) -> None:
    """Count ingestion outcomes (service.ingest.Outcome or anything with status/errors)."""
    _outcomes_counted.set(True)
    counts: dict[tuple[str, str], int] = {}
    for o in outcomes:
        if o.status == "rejected":
            key = ("rejected", reason_label(o.errors))
        elif o.status == "conflict":
            key = ("conflict", "event_id")
        else:
            key = (o.status, "")
        counts[key] = counts.get(key, 0) + 1
    for (outcome, reason), n in counts.items():
        FEEDBACK_EVENTS.labels(outcome, reason).inc(n)


def record_status_counts(counts: dict[str, int], rejected: Iterable[list[dict[str, str]]] = ()
                         ) -> None:
    """Count stored rows by store status (accepted/duplicate/conflict) and rejected items by
    their errors: the paired import, which has no Outcome objects."""
    _outcomes_counted.set(True)
    for errors in rejected:
        FEEDBACK_EVENTS.labels("rejected", reason_label(errors)).inc()
    for status, n in counts.items():
        if n:
            FEEDBACK_EVENTS.labels(status, "event_id" if status == "conflict" else "").inc(n)


def count_request_rejections(fn: Callable[[Any, bytes], T]) -> Callable[[Any, bytes], T]:
    """Wrap an ingestion handler ``fn(state, raw)``: an ApiError raised before any outcome
    was counted (bad JSON, wrong shape, too many items) counts as a rejected request."""

    @functools.wraps(fn)
    def wrapper(state: Any, raw: bytes) -> T:
        token = _outcomes_counted.set(False)
        try:
            return fn(state, raw)
        except ApiError as exc:
            if not _outcomes_counted.get():
                FEEDBACK_REQUESTS_REJECTED.labels(exc.error).inc()
            raise
        finally:
            _outcomes_counted.reset(token)

    return wrapper


# ---- request id, latency, access log -------------------------------------------------

#: Methods that label the latency histogram as themselves; any other token (h11 accepts any)
#: is "other", so a client cannot mint a new series per request.
_METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

_RID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def _incoming_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"x-request-id":
            rid = value.decode("latin-1")
            if 0 < len(rid) <= 128 and set(rid) <= _RID_OK:
                return rid
            return None
    return None


def flat_routes(app: Any) -> list[Any]:
    """The app's routes as one list, included routers expanded: newer FastAPI keeps an
    included router as one entry whose match does not say which of its routes matched (older
    ones copied the routes, so ``app.routes`` was already flat)."""
    routes = list(getattr(app, "routes", None) or ())
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI
        return routes
    return list(iter_route_contexts(routes))


def would_match(routes: Iterable[Any], scope: dict[str, Any]) -> str | None:
    """The template of the route the router would pick for ``scope`` (a full match, else
    the first partial one: a wrong method, answered 405), or None. Only matches, never runs an
    endpoint; the label is always one of the app's own templates, so it stays bounded."""
    partial = None
    probe = dict(scope)  # matching must leave the real scope as the router will find it
    for route in routes:
        try:
            match, _ = route.matches(probe)
        except Exception:  # noqa: BLE001 - a label is never worth failing a request over
            continue
        path = getattr(route, "path", None)
        if match == Match.FULL and path:
            return str(path)
        if match == Match.PARTIAL and partial is None and path:
            partial = str(path)
    return partial


class RequestContextMiddleware:
    """Pure ASGI: a request id (the caller's ``X-Request-ID`` when well-formed, else a new
    one) in a contextvar for every log line and in the response header; the latency
    histogram by route template (bounded labels: never the raw path); one access log line.

    The access line carries method, route template, path (no query string: filters could
    name a model version, and keys never travel in URLs), status and duration.

    Answers given before routing (429 from the rate limiter, 413 from the body limit) carry
    the template the request would have matched, not ``unmatched``: that label stays for
    paths no route knows, so the 404 scans are not mixed with throttled traffic."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._routes: tuple[int, int, list[Any]] | None = None

    def _template(self, scope: dict[str, Any]) -> str:
        path = getattr(scope.get("route"), "path", None)
        if path:
            return str(path)
        app = scope.get("app")
        if app is None:
            return "unmatched"
        try:
            key = (id(app), len(getattr(app, "routes", None) or ()))
            if self._routes is None or self._routes[:2] != key:
                self._routes = (*key, flat_routes(app))
            return would_match(self._routes[2], scope) or "unmatched"
        except Exception:  # noqa: BLE001 - a label is never worth failing a request over
            return "unmatched"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_request_id(scope["headers"]) or uuid.uuid4().hex
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 500
        answered = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client went away while sending its body: nothing was answered and nothing
            # failed on our side; 499 (nginx's code) keeps it out of the 5xx counts.
            status = 499
        except BaseException as exc:
            status, error = 500, exc
            if isinstance(exc, Exception) and not answered:
                # Starlette's own 500 is sent outside this middleware, without the id that
                # the traceback below is logged under: answer here (same body) with it.
                with contextlib.suppress(Exception):
                    await PlainTextResponse("Internal Server Error", 500)(
                        scope, receive, send_with_id)
            raise
        finally:
            elapsed = time.perf_counter() - started
            template = self._template(scope)
            method = scope["method"] if scope["method"] in _METHOD_LABELS else "other"
            REQUEST_LATENCY.labels(method, template, str(status)).observe(elapsed)
            level = logging.ERROR if status >= 500 else logging.INFO
            # An unhandled error (a bug, per the error policy) carries its traceback here,
            # with the request id, rendered without SQL parameters (logging_setup).
            log.log(level, "%s %s %s", scope["method"], template, status, exc_info=error,
                    extra={"method": scope["method"], "route": template,
                           "path": scope["path"], "status": status,
                           "duration_ms": round(elapsed * 1000, 2)})
            request_id_var.reset(token)


# ---- database and broker state, computed on scrape ------------------------------------

#: Seconds; a KTO job runs minutes (toy) to a day.
JOB_DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
                        86400.0, float("inf"))
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)  # kombu's redis priority lists besides the plain one


class BrokerDepth:
    """Messages waiting in the broker's queues (gpu, default). Redis: LLEN of each queue's
    lists (kombu keeps one list per priority step, under the key prefix); kombu's
    SQLAlchemy transport: visible rows of ``kombu_message``. None when it cannot tell."""

    def __init__(self, settings: Settings, queues: tuple[str, ...] = (GPU_QUEUE, DEFAULT_QUEUE)
                 ) -> None:
        self.url = settings.broker_url
        self.prefix = settings.broker_key_prefix
        self.queues = queues
        self._engine: Engine | None = None
        self._redis: Any = None

    def depth(self) -> dict[str, int] | None:
        try:
            if self.url.startswith(("redis://", "rediss://")):
                return self._redis_depth()
            if self.url.startswith("sqla+"):
                return self._sqla_depth()
        except Exception as exc:  # noqa: BLE001 - an unreachable broker is "unknown", not 500
            slog.warning("broker queue depth unavailable: %s", exc.__class__.__name__)
        return None

    def _redis_depth(self) -> dict[str, int]:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.url, socket_timeout=2,
                                               socket_connect_timeout=2)
        pipe = self._redis.pipeline(transaction=False)
        for q in self.queues:
            pipe.llen(self.prefix + q)
            for pri in _PRIORITY_STEPS:
                pipe.llen(f"{self.prefix}{q}{_PRIORITY_SEP}{pri}")
        sizes = pipe.execute()
        per = 1 + len(_PRIORITY_STEPS)
        return {q: int(sum(sizes[i * per:(i + 1) * per])) for i, q in enumerate(self.queues)}

    def _sqla_depth(self) -> dict[str, int]:
        if self._engine is None:
            url = make_url(self.url.removeprefix("sqla+"))
            args = {"timeout": 2} if url.get_backend_name() == "sqlite" else {}
            self._engine = create_engine(url, pool_size=1, max_overflow=0, connect_args=args)
        out = dict.fromkeys(self.queues, 0)
        with self._engine.connect() as conn:
            names = set(conn.dialect.get_table_names(conn))
            if not {"kombu_queue", "kombu_message"} <= names:
                return out  # no message sent yet: kombu creates its tables lazily
            rows = conn.execute(text(
                "SELECT q.name, COUNT(m.id) FROM kombu_message m "
                "JOIN kombu_queue q ON m.queue_id = q.id WHERE m.visible "
                "GROUP BY q.name")).all()
        for name, n in rows:
            if name in out:
                out[name] = int(n)
        return out

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        if self._redis is not None:
            self._redis.close()


def job_state(engine: Engine) -> dict[str, Any]:
    """Jobs by status, finished jobs' durations, and each running job's latest step metrics."""
    with engine.connect() as conn:
        by_status = dict.fromkeys(JOB_STATUSES, 0)
        for status, n in conn.execute(select(tj.c.status, func.count()).group_by(tj.c.status)):
            by_status[status] = int(n)
        finished = conn.execute(select(tj.c.status, tj.c.started_at, tj.c.finished_at).where(
            tj.c.status.in_(("succeeded", "failed", "cancelled")),
            tj.c.started_at.is_not(None), tj.c.finished_at.is_not(None))).all()
        latest = (select(jm.c.job_id, func.max(jm.c.step).label("step"))
                  .group_by(jm.c.job_id).subquery())
        running = conn.execute(
            select(tj.c.id, tj.c.line, tj.c.step, tj.c.total_steps, tj.c.started_at,
                   jm.c.metrics)
            .select_from(tj.outerjoin(latest, latest.c.job_id == tj.c.id)
                         .outerjoin(jm, (jm.c.job_id == latest.c.job_id)
                                    & (jm.c.step == latest.c.step)))
            .where(tj.c.status == "running")).all()
    durations: dict[str, list[float]] = {}
    for status, started, ended in finished:
        durations.setdefault(status, []).append(max(0.0, (ended - started).total_seconds()))
    return {"by_status": by_status, "durations": durations,
            "running": [dict(r._mapping) for r in running]}


def _histogram(name: str, doc: str, durations: dict[str, list[float]]) -> Metric:
    fam = HistogramMetricFamily(name, doc, labels=["status"])
    for status in ("succeeded", "failed", "cancelled"):
        values = durations.get(status, [])
        buckets = [(floatToGoString(b), float(sum(v <= b for v in values)))
                   for b in JOB_DURATION_BUCKETS]
        fam.add_metric([status], buckets, float(sum(values)))
    return fam


class StateCollector(Collector):
    """Database and broker gauges for one app, computed at scrape time."""

    def __init__(self, engine: Engine, broker: BrokerDepth) -> None:
        self.engine = engine
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("prospect_state_up",
                               "1 when the database answered this scrape's state queries.")
        try:
            state = job_state(self.engine)
        except Exception as exc:  # noqa: BLE001 - a scrape during an outage reports up=0
            slog.warning("state metrics unavailable: %s", exc.__class__.__name__)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        jobs = GaugeMetricFamily("prospect_jobs", "Training jobs by status.", labels=["status"])
        for status, n in state["by_status"].items():
            jobs.add_metric([status], float(n))
        yield jobs
        yield _histogram("prospect_job_duration_seconds",
                         "Wall time of finished jobs (started to finished), by final status.",
                         state["durations"])
        step = GaugeMetricFamily("prospect_job_step", "Last recorded optimizer step of each "
                                 "running job.", labels=["line", "job_id"])
        total = GaugeMetricFamily("prospect_job_total_steps", "Planned steps of each running "
                                  "job.", labels=["line", "job_id"])
        tps = GaugeMetricFamily("prospect_training_tokens_per_second", "Training throughput "
                                "at the last recorded step of each running job.",
                                labels=["line", "job_id"])
        for r in state["running"]:
            labels = [r["line"], str(r["id"])]
            step.add_metric(labels, float(r["step"] or 0))
            if r["total_steps"]:
                total.add_metric(labels, float(r["total_steps"]))
            value = (r["metrics"] or {}).get("tokens_per_s")
            if isinstance(value, int | float):
                tps.add_metric(labels, float(value))
        yield step
        yield total
        yield tps
        depth = self.broker.depth()
        qd = GaugeMetricFamily("prospect_queue_depth", "Messages waiting in the broker queue.",
                               labels=["queue"])
        for q, n in (depth or {}).items():
            qd.add_metric([q], float(n))
        yield qd


def metrics_payload(collector: StateCollector) -> bytes:
    """The exposition text: process metrics (or all workers' in multiprocess mode) + state."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(PROCESS_REGISTRY))
    registry.register(collector)
    return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


def install(app: Any, settings: Settings) -> None:
    """Add the request middleware and, when enabled, ``GET /metrics`` to ``app``.

    /metrics is open by default (Prometheus scrapes from inside the network and the numbers
    carry no user data); ``PROSPECT_METRICS_REQUIRE_KEY=true`` makes it need a read-scope key
    (Prometheus: ``authorization: {credentials: <key>}`` in the scrape config)."""
    from service.auth import require

    broker = BrokerDepth(settings)
    app.state.broker_depth = broker
    collector = StateCollector(app.state.engine, broker)
    app.state.state_collector = collector
    needs_key = require("read")

    if settings.metrics_enabled:
        @app.get("/metrics", include_in_schema=False)
        async def metrics(request: Request) -> Response:
            if settings.metrics_require_key:
                await needs_key(request)
            body = await run_in_threadpool(metrics_payload, collector)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestContextMiddleware)
