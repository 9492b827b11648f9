"""Resume states a job's next attempt must not resume: trained on events deleted since.

A job's selection is frozen (an event-id range, filters, the cap and split by hash), so the
only way its event ids differ between two attempts is that events were deleted in between: a
user's erasure or feedback retention (service/erasure.py). Its resume states then hold weights
trained on those events: resuming would carry the deleted data into the final model (and the
trainer refuses them anyway, their data fingerprint differs). The attempt starts over and
deletes them. Only the data is compared here: other differences (hyperparameters, π_ref,
process count) still reach the trainer, which refuses them naming what changed.
"""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

_ASIDE = "checkpoints.discarded-"


def trained_on_other_events(checkpoint: Path, event_ids_sha256: str) -> str | None:
    """Why ``checkpoint`` (a ``checkpoints/step-*`` folder of this job) must not be resumed by
    an attempt training on ``event_ids_sha256``; None when it may be (or its manifest, written
    before the digest was recorded or gone meanwhile, cannot tell: the trainer decides)."""
    try:
        manifest = json.loads((checkpoint / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    saved = (manifest.get("data") or {}).get("event_ids_sha256")
    if not saved or saved == event_ids_sha256:
        return None
    return (f"resume state {checkpoint.name} was trained on events deleted since (an erasure or "
            f"feedback retention: event ids sha256 {saved[:12]}, now {event_ids_sha256[:12]}); "
            "the attempt starts over and the resume states were deleted")


def discard(out_dir: Path) -> None:
    """Remove ``out_dir/checkpoints``: renamed first, so a crash midway leaves nothing that
    looks like a resume state; what such a crash left is removed by the next call."""
    try:
        (out_dir / "checkpoints").rename(out_dir / f"{_ASIDE}{secrets.token_hex(4)}")
    except FileNotFoundError:
        pass
    for aside in out_dir.glob(f"{_ASIDE}*"):
        shutil.rmtree(aside, ignore_errors=True)
