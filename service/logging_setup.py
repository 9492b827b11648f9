"""Structured logs: one JSON object per line, each carrying the request id of its request.

Why JSON: log shippers (Loki, CloudWatch, Elastic) index fields without regexes, and an
operator can follow one request across the access line and whatever it logged in between.

What never reaches a log: request and response bodies (so no prompts, completions or raw
user ids), query strings, and API keys. Nothing here logs bodies; as a second line of
defence every rendered record is scrubbed of anything shaped like a Prospect key, and
SQLAlchemy errors are rendered without their bound parameters (which would hold prompts).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

#: The id of the request being served in this task/thread ("-" outside a request).
request_id_var: ContextVar[str] = ContextVar("prospect_request_id", default="-")

#: Anything that looks like an API key (prefix + token_urlsafe) is replaced before writing.
_KEY_RE = re.compile(r"prospect_[A-Za-z0-9_\-]{16,}")
_KEY_MASK = "prospect_[redacted]"

#: LogRecord attributes that are not user-supplied extras.
_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}

_HANDLER_MARK = "_prospect_handler"


def scrub(text: str) -> str:
    """Mask key-shaped substrings."""
    return _KEY_RE.sub(_KEY_MASK, text)


def _format_exception(exc_info: Any) -> str:
    etype, exc, tb = exc_info
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        # SQLAlchemy's StatementError prints bound parameters (prompts, completions) unless
        # told not to; the statement text itself is ours and safe.
        if hasattr(cur, "hide_parameters"):
            cur.hide_parameters = True
        cur = cur.__cause__ or cur.__context__
    return "".join(traceback.format_exception(etype, exc, tb))


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", "request_id", ...extras, "exc"}."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and k not in out and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = _format_exception(record.exc_info)
        line = orjson.dumps(out, default=str).decode()
        return scrub(line)


class TextFormatter(logging.Formatter):
    """Human-readable, for a terminal; still scrubbed and still carrying the request id."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        saved = record.exc_info
        if saved:
            record.exc_text = _format_exception(saved)
        return scrub(super().format(record))


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Install one stderr handler on the root logger (idempotent: re-running replaces it).

    uvicorn's and gunicorn's error loggers are routed through it too; their access loggers are
    silenced because the request middleware writes one access line per request with its id,
    route template and duration (theirs would carry query strings and client addresses).
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "gunicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    for name in ("uvicorn.access", "gunicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = False
        lg.disabled = True
