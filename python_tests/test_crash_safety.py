"""Nothing lost when a run is killed: atomic outputs, ``train --checkpoint-every/--resume`` ending with the
same adapter as an uninterrupted run, and the demo reusing its finished cells."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transpeft_kernels import cli
from transpeft_kernels.atomic_io import atomic_dir, atomic_files, atomic_path, atomic_write_json

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parent.parent


# ---- the atomic writers ----------------------------------------------------------------------------
def test_a_write_that_fails_leaves_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"old": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"new": ')  # half written, then the run dies
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left behind


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "b.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("killed")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "1", "b.txt": "1"}
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("3")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_files_published_into_a_shared_directory_config_last(tmp_path):
    (tmp_path / "keep.txt").write_text("other output")
    order = []
    real = os.replace
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", lambda a, b: order.append(Path(b).name) or real(a, b))
        with atomic_files(tmp_path, last=("adapter_config.json",)) as tmp:
            (tmp / "adapter_config.json").write_text("{}")
            (tmp / "adapter_model.safetensors").write_bytes(b"x")
    assert order == ["adapter_model.safetensors", "adapter_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "keep.txt"]


# ---- train: checkpoints and resume -----------------------------------------------------------------
@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    from test_workflow import _pairs, _save_base, _write_jsonl

    root = tmp_path_factory.mktemp("crash")
    return _save_base(root / "base", seed=0), _write_jsonl(root / "train.jsonl", _pairs(64, seed=1))


def _train_args(base, data, out, *extra):
    return ["train", "--base", str(base), "--data", str(data), "--out", str(out), "--masking", "0.2",
            "--dropping", "0.2", "--targets", "q_proj", "v_proj", "gate_proj", "down_proj", "--r", "4",
            "--lora-dropout", "0.1", "--batch-size", "4", "--max-steps", "24", "--lr", "1e-2", "--no-progress",
            "--seed", "3", *extra]


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def _assert_same_adapter(a, b):
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(base_and_data, tmp_path_factory):
    base, data = base_and_data
    out = tmp_path_factory.mktemp("straight") / "adapter"
    assert cli.main(_train_args(base, data, out)) == 0
    return out


def test_resume_after_a_crash_ends_with_the_same_adapter(base_and_data, uninterrupted, tmp_path, monkeypatch):
    """The run dies right after its second checkpoint (step 10); --resume continues from there."""
    from transpeft_kernels.workflow import checkpoint

    base, data = base_and_data
    out = tmp_path / "adapter"
    saves = []
    real_save = checkpoint.save

    def save_then_die(*args):
        real_save(*args)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # as a kill after the checkpoint reached the disk

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cli.main(_train_args(base, data, out, "--checkpoint-every", "5"))
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert not (out / "adapter_model.safetensors").exists()
    assert cli.main(_train_args(base, data, out, "--checkpoint-every", "5", "--resume")) == 0
    _assert_same_adapter(out, uninterrupted)
    log = json.loads((out / "train_log.json").read_text())
    straight = json.loads((uninterrupted / "train_log.json").read_text())
    assert log["steps"] == straight["steps"] == 16 and log["losses"] == straight["losses"]


def _outputs_valid(out: Path) -> None:
    """Every output that exists is whole: JSON parses, safetensors load, the checkpoint loads."""
    for f in out.rglob("*"):
        if f.is_file() and not f.name.startswith("."):
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                _adapter(f.parent)
            elif f.name == "state.pt":
                torch.load(f, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("trial", [0, 1])
def test_kill_at_a_random_point_then_resume(base_and_data, uninterrupted, tmp_path, trial):
    base, data = base_and_data
    out = tmp_path / "adapter"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = _train_args(base, data, out, "--checkpoint-every", "3")
    proc = subprocess.Popen([sys.executable, "-m", "transpeft_kernels", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(trial).uniform(0.0, 0.4))  # somewhere in the middle of training or saving
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _outputs_valid(out)
    if not (out / "checkpoint" / "state.pt").exists():
        pytest.skip("killed before the first checkpoint: nothing to resume")
    assert cli.main(_train_args(base, data, out, "--checkpoint-every", "3", "--resume")) == 0
    _outputs_valid(out)
    _assert_same_adapter(out, uninterrupted)


def test_resume_problems_fail_in_one_line(base_and_data, tmp_path, capsys):
    base, data = base_and_data
    out = tmp_path / "adapter"
    assert cli.main(_train_args(base, data, out, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "no checkpoint" in err[0]
    first = _train_args(base, data, out, "--checkpoint-every", "4")
    first[first.index("--max-steps") + 1] = "5"
    assert cli.main(first) == 0  # leaves a checkpoint at step 4
    args = [*first, "--resume"]
    args[args.index("--lr") + 1] = "5e-3"  # another learning rate: not the same run
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other arguments" in err[-1] and "lr" in err[-1]
    assert cli.main(_train_args(base, data, out, "--checkpoint-every", "-1")) == 2
    assert "--checkpoint-every" in capsys.readouterr().err


# ---- the demo reuses finished cells ----------------------------------------------------------------
def test_demo_rerun_reuses_finished_cells(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--tiny", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    first = json.loads((out / "results.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in [*(out / "adapters").rglob("*.safetensors"),
                                                *(out / "new_base").glob("*.safetensors"), *(out / "cells").glob("*.json")]}
    assert len(stamps) >= 3 + 1 + 6
    (out / "cells" / "eval_new_vanilla.json").unlink()  # as if killed before this evaluation finished
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "reused" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == first["rows"]
    for p, t in stamps.items():
        if p.name != "eval_new_vanilla.json":
            assert p.stat().st_mtime_ns == t, p  # not recomputed


# ---- the benchmark runner keeps finished cases -----------------------------------------------------
def test_bench_resume_keeps_finished_cases_and_drops_a_torn_line(tmp_path):
    from transpeft_kernels.bench import cases
    from transpeft_kernels.bench.records import read_jsonl
    from transpeft_kernels.bench.suite import run_suite

    preset = cases.preset("smoke")
    keys = [c.key for c in preset.cases if getattr(c, "op", "train_step") == "lora_linear"]
    assert len(keys) >= 2
    run_suite(preset, tmp_path, ops=("lora_linear",), impls=("vanilla", "torch"), log=lambda m: None)
    first = read_jsonl(tmp_path / "results.jsonl")
    kept = [r for r in first if r["case_key"] == keys[0]]
    # as if killed while writing the second case: its line torn in half
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept) + '{"op": "lora_')
    seen = []
    run_suite(preset, tmp_path, ops=("lora_linear",), impls=("vanilla", "torch"), log=seen.append, resume=True)
    again = read_jsonl(tmp_path / "results.jsonl")
    assert [r for r in again if r["case_key"] == keys[0]] == kept  # not re-measured
    assert {r["case_key"] for r in again} == set(keys)
    assert sum("finished by the earlier run" in m for m in seen) == 1
