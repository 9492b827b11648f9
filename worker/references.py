"""Taking π_ref snapshots: the files (worker/snapshot.py) and the rows (service/references.py).

The line's production model is its base model until the registry promotes a checkpoint; then
it is the production checkpoint's folder (service.registry.production_source). The registry
requests a snapshot itself whenever production changes (promotion or rollback).
A periodic snapshot of an unchanged production model writes nothing; a requested one is
answered `unchanged` and points at the snapshot with the same content.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from service.references import (
    claim_snapshot,
    complete_snapshot,
    fail_snapshot,
    get_snapshot,
    latest_ready,
    request_snapshot,
    snapshot_heartbeat,
)
from service.registry import production_source as registry_production_source
from service.settings import Settings
from worker.heartbeat import heartbeating
from worker.snapshot import freeze, publish, remove_tree, resolve_source, tree_hash

log = logging.getLogger("prospect.references")


def production_source(engine: Engine, settings: Settings, line: str) -> str:
    """The production checkpoint's artifact folder, or the base model before any promotion."""
    with engine.begin() as conn:
        return registry_production_source(conn, settings, line)


def snapshot_dir(settings: Settings, line: str, snapshot_id: int) -> Path:
    return Path(settings.artifacts_root).expanduser().resolve() / "references" / line / str(
        snapshot_id)


def take_snapshot(engine: Engine, settings: Settings, snapshot_id: int) -> dict[str, Any]:
    """Fill a pending snapshot row: hash the source, copy it unless unchanged, mark the row.

    The same task can be delivered twice (the gate sweep re-sends a snapshot left pending;
    the broker redelivers after its visibility timeout). A delivery claims the row and keeps a
    heartbeat on it while it hashes and copies; another one returns while that heartbeat is
    recent (``heartbeat_timeout_s``). Should two copy anyway (a heartbeat that stalled), each
    copies into a staging folder of its own, and only the one whose conditional UPDATE finds the
    row still pending renames it into place, in that transaction; the other discards its copy
    and leaves the row, and the folder it names, alone."""
    with engine.begin() as conn:
        token = claim_snapshot(conn, snapshot_id, settings.heartbeat_timeout_s,
                               settings.snapshot_max_attempts)
        snap = get_snapshot(conn, snapshot_id)
    if snap["status"] != "pending" or token is None:
        if snap["status"] == "pending":
            log.info("snapshot %s is being taken by another worker", snapshot_id)
        return snap
    def beat() -> None:
        with engine.begin() as conn:
            snapshot_heartbeat(conn, snapshot_id, token)

    with heartbeating(beat, settings.heartbeat_interval_s, f"snapshot-{snapshot_id}"):
        return _take(engine, settings, snap, token)


class _CopyFirst(Exception):
    pass


def _take(engine: Engine, settings: Settings, snap: dict[str, Any], token: str) -> dict[str, Any]:
    snapshot_id = snap["id"]
    path = snapshot_dir(settings, snap["line"], snapshot_id)
    staging = path.with_name(f".{path.name}.staging-{secrets.token_hex(8)}")
    try:
        src = resolve_source(snap["source"])
        th = tree_hash(src)
        with engine.connect() as conn:
            prev = latest_ready(conn, snap["line"])
        if prev is None or prev["content_hash"] != th.content_hash:
            freeze(src, staging, snap["source"], th)
        while True:
            try:
                with engine.begin() as conn:
                    done = complete_snapshot(conn, snapshot_id, th.content_hash, str(path), th.size_bytes,
                                             token)
                    if done is not None and done["status"] == "ready":
                        if not staging.exists():
                            raise _CopyFirst  # rolls the decision back: no copy inside a transaction
                        publish(staging, path)
                    elif done is not None and path.exists():
                        remove_tree(path)  # unchanged: a crashed attempt's half-made folder
                break
            except _CopyFirst:  # the identical snapshot was deleted (or superseded) since the hash
                freeze(src, staging, snap["source"], th)
        if done is None:
            with engine.connect() as conn:
                done = get_snapshot(conn, snapshot_id)
            log.info("snapshot %s was decided by another delivery: %s", snapshot_id, done["status"])
            return done
        log.info("snapshot %s of %s: %s", snapshot_id, snap["source"], done["status"])
        return done
    except Exception as exc:
        with engine.begin() as conn:
            fail_snapshot(conn, snapshot_id, f"{type(exc).__name__}: {exc}", token)
        raise
    finally:
        if staging.exists():
            remove_tree(staging)


def current_reference(engine: Engine, settings: Settings, line: str,
                      requested_by: int | None = None) -> dict[str, Any]:
    """The line's latest ready snapshot if production did not change since; else a new one."""
    source = production_source(engine, settings, line)
    with engine.connect() as conn:
        prev = latest_ready(conn, line)
    if prev is not None and prev["source"] == source:
        if tree_hash(resolve_source(source)).content_hash == prev["content_hash"]:
            return prev
    with engine.begin() as conn:
        snap = request_snapshot(conn, line, source, requested_by)
    done = take_snapshot(engine, settings, snap["id"])
    if done["status"] == "unchanged":
        with engine.connect() as conn:
            return get_snapshot(conn, done["same_as_id"])
    return done
