"""Freeze a model folder into an immutable, hashed π_ref snapshot under the artifacts root.

A snapshot is a plain Hugging Face model folder (safetensors, config, tokenizer) plus
``manifest.json`` with every file's sha256, so ``from_pretrained(path)`` loads it and anyone can
verify it was not touched. Files are made read-only. The content hash covers the model files
only (not the manifest), so the same weights always hash the same and an unchanged production
model is not copied again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from service.references import remove_snapshot_files as remove_tree

MANIFEST = "manifest.json"
FORMAT = "prospect.reference/v1"
#: Written by Prospect's trainer beside the weights; never part of π_ref.
_SKIP = {MANIFEST, "trainer_state.pt", "reference_logps.pt"}
#: From a hub repository only what loading needs (no duplicate .bin/.pth, no images).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja"]


@dataclass(frozen=True)
class TreeHash:
    content_hash: str
    files: dict[str, str]
    size_bytes: int


def resolve_source(source: str) -> Path:
    """A local folder as is; anything else is a Hugging Face model id, fetched to the hub
    cache (honours HF_HOME / HF_HUB_OFFLINE)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or source.startswith("."):
        raise FileNotFoundError(f"model folder {source} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=HUB_PATTERNS))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name not in _SKIP
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def tree_hash(folder: str | Path) -> TreeHash:
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): _sha256(p) for p in _files(folder)}
    if not files:
        raise FileNotFoundError(f"{folder} holds no model files")
    h = hashlib.sha256()
    for rel, digest in files.items():
        h.update(f"{rel}\0{digest}\n".encode())
    size = sum((folder / rel).stat().st_size for rel in files)
    return TreeHash(h.hexdigest(), files, size)


def freeze(source_dir: Path, tmp: Path, source_name: str, expected: TreeHash) -> TreeHash:
    """Copy into the staging folder ``tmp`` (private to this attempt), verify the copy and make it
    read-only; :func:`publish` then renames it into place once the row says it won."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rel in expected.files:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_dir / rel, target)
    got = tree_hash(tmp)
    if got.content_hash != expected.content_hash:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"copy of {source_dir} changed while it was copied; try again")
    (tmp / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "source": source_name, "content_hash": got.content_hash,
        "size_bytes": got.size_bytes, "files": got.files,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2, sort_keys=True))
    read_only = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
    for p in tmp.rglob("*"):
        if p.is_file():
            p.chmod(read_only)
    return got


def publish(tmp: Path, dest: Path) -> None:
    """Rename a staged copy into ``dest``. Only the attempt that marked the row ready calls it,
    inside that transaction, so whatever sits at ``dest`` is a crashed attempt's leftover."""
    if dest.exists():
        remove_tree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)


def verify_snapshot(folder: str | Path) -> bool:
    """True when the folder's files still match its manifest."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return tree_hash(folder).content_hash == manifest["content_hash"]
    except (OSError, ValueError, KeyError):
        return False
