"""Scaling out under torchrun (and accelerate launch): DDP (find_unused_parameters False and True),
FSDP2 and DeepSpeed ZeRO-2/3, two CPU ranks over gloo, adapters on the FFN projections. Time-bounded: a hang fails the test."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
SCRIPT = Path(__file__).with_name("dist_train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, mode: str, nproc: int, *extra: str, launcher=None, env=None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    if launcher is None:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] \
            if mode != "single" else [sys.executable]
    proc = subprocess.run([*launcher, str(SCRIPT), "--mode", mode, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


def _available(mode: str) -> None:
    """DeepSpeed ZeRO-2/3 (its CPU accelerator over gloo) when deepspeed is installed. Under ZeRO-3 the
    sharded projections run their own forward (which gathers the weights); the mask still applies."""
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")


@pytest.mark.parametrize("mode", ["ddp", "ddp_unused", "fsdp2", "zero2", "zero3"])
def test_ranks_agree_with_masking_and_dropping(tmp_path, mode):
    _available(mode)
    ranks = _launch(tmp_path, mode, 2)
    assert ranks[0]["ran"] == ranks[1]["ran"], "dropping decisions differ between ranks"
    assert len(ranks[0]["ran"]) < 2 * 4, "no FFN was skipped: dropping was not exercised"
    for name, p in ranks[0]["params"].items():
        torch.testing.assert_close(p, ranks[1]["params"][name], atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "zero2", "zero3"])
def test_data_parallel_equals_single_process_without_masking_and_dropping(tmp_path, mode):
    _available(mode)
    flags = ("--masking", "0", "--dropping", "0")
    single = _launch(tmp_path / "single", "single", 1, *flags)[0]
    parallel = _launch(tmp_path / mode, mode, 2, *flags)[0]
    for name, p in single["params"].items():
        torch.testing.assert_close(parallel["params"][name], p, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_accelerate_launch(tmp_path):
    pytest.importorskip("accelerate")
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if exe is None:
        pytest.skip("the accelerate command is not on PATH")
    # accelerate's multi-process launcher (torch.distributed underneath), forced onto the CPU.
    launcher = [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    ranks = _launch(tmp_path, "ddp", 2, launcher=launcher, env=dict(os.environ, ACCELERATE_USE_CPU="1"))
    assert ranks[0]["ran"] == ranks[1]["ran"]
    for name, p in ranks[0]["params"].items():
        torch.testing.assert_close(p, ranks[1]["params"][name], atol=0, rtol=0)

