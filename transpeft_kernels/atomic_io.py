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


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yields a fresh temporary directory next to ``target`` (for ``save_pretrained`` and other
    writers of several files); on a clean exit it replaces ``target`` by renames, on an error it is
    removed. A run killed at any point leaves the old directory, the new one, or (between the two
    renames) none at ``target`` with the old one beside it as ``.<name>.old-*``: never a half-written one."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(target_dir: str | os.PathLike, last: tuple[str, ...] = ()):
    """Yields a temporary directory inside ``target_dir``; on a clean exit every file written there is
    fsynced and renamed into ``target_dir`` (the names in ``last`` after the others, e.g. a config that
    marks the files beside it as complete). For writers such as ``save_pretrained`` whose files share a
    directory with other outputs: each file is replaced atomically, none is ever seen half-written."""
    import shutil

    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".writing.", dir=target_dir))
    try:
        yield tmp
        files = sorted((f for f in tmp.rglob("*") if f.is_file()), key=lambda f: (f.name in last, str(f)))
        for f in files:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            dest = target_dir / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
