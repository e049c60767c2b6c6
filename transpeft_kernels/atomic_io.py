"""Atomic file writes: a temporary file in the target's directory, flushed and fsynced, then renamed
over the target. A run killed at any point leaves either the old file or the new one, never a
truncated file that a later command would read as valid."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yields a temporary path next to ``target`` for code that writes to a path (safetensors,
    savefig); on a clean exit it is fsynced and renamed over ``target``, on an error removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode())


def atomic_write_json(target: str | os.PathLike, obj, indent: int | None = 1) -> None:
    atomic_write_text(target, json.dumps(obj, indent=indent) + "\n")
