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
        _fsync_dir(target.parent)
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


def _fsync_dir(path: Path) -> None:
    """Makes the renames in ``path`` durable across a power loss, not only a killed process."""
    with contextlib.suppress(OSError):  # some filesystems cannot open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def recover_dir(target: str | os.PathLike) -> None:
    """Clears what a killed ``atomic_dir`` left next to ``target``: a temporary directory that may be
    half written (removed), and, when the kill fell between its two renames, the previous directory
    set aside (put back at ``target``; removed when ``target`` is there)."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    import shutil

    tmp_prefix, old_prefix = f".{target.name}.", f".{target.name}.old-"
    olds, tmps = [], []
    for p in parent.iterdir():
        if p.is_dir() and p.name.startswith(old_prefix):
            olds.append(p)
        elif p.is_dir() and p.name.startswith(tmp_prefix) and p.name.endswith(".tmp"):
            tmps.append(p)
    for p in tmps:
        shutil.rmtree(p, ignore_errors=True)
    olds.sort(key=lambda p: p.stat().st_mtime_ns)
    if olds and not target.exists():
        os.replace(olds.pop(), target)
        _fsync_dir(parent)
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yields a fresh temporary directory next to ``target`` (for ``save_pretrained`` and other
    writers of several files); on a clean exit it replaces ``target`` by renames, on an error it is
    removed. A run killed at any point leaves the old directory or the new one at ``target``, or,
    between the two renames, the old one beside it as ``.<name>.old-*``, which ``recover_dir`` (run
    here first, and by readers) puts back: a half-written directory is never at ``target``."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(target_dir: str | os.PathLike, last: tuple[str, ...] = ()):
    """Yields a temporary directory inside ``target_dir``; on a clean exit every file written there is
    fsynced and renamed into ``target_dir``. For writers such as ``save_pretrained`` whose files share a
    directory with other outputs. The names in ``last`` mark the files beside them as complete (a PEFT
    adapter is read only when ``adapter_config.json`` is there): they are removed from ``target_dir``
    before anything else is replaced and put back after it, so a kill while publishing leaves no marker
    rather than a new file beside an old one."""
    import shutil

    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    for p in target_dir.iterdir():  # a killed earlier publish's temporary directory
        if p.is_dir() and p.name.startswith(".writing.") and p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".writing.", suffix=".tmp", dir=target_dir))
    try:
        yield tmp
        _fsync_tree(tmp)
        files = sorted((f for f in tmp.rglob("*") if f.is_file()), key=lambda f: (f.name in last, str(f)))
        markers = [target_dir / f.relative_to(tmp) for f in files if f.name in last]
        for m in markers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(m)
        if markers:
            _fsync_dir(target_dir)
        for f in files:
            dest = target_dir / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
        _fsync_dir(target_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
