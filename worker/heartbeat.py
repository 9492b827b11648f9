"""A heartbeat from a background thread while the calling thread is busy with long work."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger("prospect.heartbeat")


@contextlib.contextmanager
def heartbeating(beat: Callable[[], object], interval_s: float, what: str) -> Iterator[None]:
    """Call ``beat`` every ``interval_s`` until the block ends. A database error is logged and
    the next beat tried: a blip must not stop the work the heartbeat vouches for."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            try:
                beat()
            except SQLAlchemyError as exc:
                log.warning("%s: heartbeat failed: %s", what, exc)

    thread = threading.Thread(target=run, name=f"heartbeat-{what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
