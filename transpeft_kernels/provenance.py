"""Provenance of every figure the package writes: the source commit and the environment."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

COMMIT_ENV = "TPK_COMMIT"
COMMIT_FILE = "COMMIT"  # at the repository root, for machines without git


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the record says so by None
        return None


def commit(repo: Path | None = None) -> str:
    """The source version measured: $TPK_COMMIT, else a COMMIT file at the repo root, else git
    (with "-dirty" when the tree has uncommitted changes), else "unknown"."""
    repo = repo or Path(__file__).resolve().parents[1]
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV].strip()
    f = repo / COMMIT_FILE
    if f.is_file() and f.read_text().strip():
        return f.read_text().strip()
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None) -> dict:
    """Where and with what a figure was measured: the device (default: the first GPU, else the CPU),
    the CPU, the versions and the source commit."""
    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": device.type, "gpu": gpu, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "triton": _version("triton"), "cuda": torch.version.cuda,
        "transformers": _version("transformers"), "peft": _version("peft"), "commit": commit(),
    }
