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
from transpeft_kernels.atomic_io import atomic_dir, atomic_files, atomic_path, atomic_write_json, recover_dir

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
    (tmp_path / "adapter_config.json").write_text('{"old": 1}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"old")
    order = []
    real = os.replace

    def replace(a, b):
        # no marker beside a weights file that is not yet the new one
        order.append((Path(b).name, (tmp_path / "adapter_config.json").exists()))
        real(a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        with atomic_files(tmp_path, last=("adapter_config.json",)) as tmp:
            (tmp / "adapter_config.json").write_text("{}")
            (tmp / "adapter_model.safetensors").write_bytes(b"x")
    assert order == [("adapter_model.safetensors", False), ("adapter_config.json", False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "keep.txt"]
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"x"


def test_a_kill_between_the_two_renames_keeps_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint"
    with atomic_dir(target) as tmp:
        (tmp / "state.pt").write_text("step 4")
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(b)
        if len(calls) == 2:  # the old directory is already aside, the new one not yet in place
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "state.pt").write_text("step 8")
    monkeypatch.setattr(os, "replace", real)
    assert not target.exists()
    (tmp_path / ".checkpoint.abc123.tmp").mkdir()  # and a half-written one of another killed run
    recover_dir(target)
    assert (target / "state.pt").read_text() == "step 4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_jsonl_torn_line_is_cut_before_the_next_append(tmp_path):
    from transpeft_kernels.bench.records import append_jsonl, read_jsonl

    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"a": 1}])
    with path.open("a") as f:
        f.write('{"a": 2, "b"')  # killed mid-write
    assert read_jsonl(path) == [{"a": 1}]
    append_jsonl(path, [{"a": 3}])
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}]
    assert path.read_text().count("\n") == 2
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')  # damage inside the file is not a torn write
    with pytest.raises(ValueError, match=":2: not a JSON record"):
        read_jsonl(path)


# ---- train: checkpoints and resume -----------------------------------------------------------------
@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    from test_workflow import _pairs, _save_base, _write_jsonl

    root = tmp_path_factory.mktemp("crash")
    return _save_base(root / "base", seed=0), _write_jsonl(root / "train.jsonl", _pairs(64, seed=1))


def _train_args(base, data, out, *extra):
    return ["train", "--base", str(base), "--data", str(data), "--out", str(out), "--masking", "0.2",
            "--dropping", "0.2", "--targets", "q_proj", "v_proj", "gate_proj", "down_proj", "--r", "4",
            "--lora-dropout", "0.1", "--batch-size", "4", "--epochs", "2", "--max-steps", "24", "--lr", "1e-2",
            "--no-progress", "--seed", "3", *extra]


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
    # 24 steps of 4 of 64 examples: the run resumed in the second pass over the data
    assert log["steps"] == straight["steps"] == 24 and log["losses"] == straight["losses"]


def _outputs_valid(out: Path) -> None:
    """Every output that exists is whole: JSON parses, safetensors load, the checkpoint loads, and an
    adapter_config.json (what makes PEFT read the directory as an adapter) has its weights beside it.
    Temporaries (dot names) are not outputs."""
    for f in out.rglob("*"):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(out).parts):
            continue
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".safetensors":
            _adapter(f.parent)
        elif f.name == "state.pt":
            torch.load(f, map_location="cpu", weights_only=True)
    if (out / "adapter_config.json").exists():
        _adapter(out)


def _stamp(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def test_killed_at_random_points_again_and_again_then_resumed(base_and_data, uninterrupted, tmp_path):
    """SIGKILL each run a random moment after it saved a checkpoint of its own (inside a step, a
    checkpoint write or the final save), check every output, resume; the last run ends with the adapter
    of the uninterrupted run."""
    base, data = base_and_data
    out, state = tmp_path / "adapter", tmp_path / "adapter" / "checkpoint" / "state.pt"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    kills, finished = 0, False
    for _ in range(3):
        resume = ["--resume"] if state.exists() else []
        before = _stamp(state)
        proc = subprocess.Popen([sys.executable, "-m", "transpeft_kernels",
                                 *_train_args(base, data, out, "--checkpoint-every", "2", *resume)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 180
        while _stamp(state) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=60)
        _outputs_valid(out)
        if proc.returncode == 0:
            finished = True
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert kills >= 2
    if not finished:
        assert cli.main(_train_args(base, data, out, "--checkpoint-every", "2", "--resume")) == 0
        _outputs_valid(out)
    _assert_same_adapter(out, uninterrupted)
    assert json.loads((out / "train_log.json").read_text())["losses"] == \
        json.loads((uninterrupted / "train_log.json").read_text())["losses"]


def test_resume_problems_fail_in_one_line(base_and_data, tmp_path, capsys):
    base, shared = base_and_data
    data = tmp_path / "train.jsonl"  # a copy this test may edit
    data.write_text(Path(shared).read_text())
    out = tmp_path / "adapter"

    def args(*extra, lr="1e-2"):
        a = _train_args(base, data, out, "--checkpoint-every", "4", *extra)
        a[a.index("--max-steps") + 1] = "5"
        a[a.index("--lr") + 1] = lr
        return a

    def one_error_line():
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert cli.main(args("--resume")) == 2
    line = one_error_line()
    assert "--resume" in line and "no checkpoint" in line
    assert cli.main(args()) == 0  # leaves a checkpoint at step 4
    capsys.readouterr()
    assert cli.main(args("--resume", lr="5e-3")) == 2  # another learning rate: not the same run
    line = one_error_line()
    assert line.startswith("transpeft: error: --resume:") and "other arguments" in line and "lr" in line
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]))  # same path and arguments, other data
    assert cli.main(args("--resume")) == 2
    assert "data_sha256" in one_error_line()
    assert cli.main(_train_args(base, data, out, "--checkpoint-every", "-1")) == 2
    assert "--checkpoint-every" in one_error_line()


# ---- the demo continues a killed run from its finished cells -----------------------------------------
def _demo_cells(out: Path) -> dict:
    files = [*out.glob("update/step_*"), *out.glob("adapters/*/*/info.json"),
             *out.glob("adapters/*/*/adapter_model.safetensors"), *out.glob("scores/*/*/*.json")]
    return {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}


def test_a_killed_demo_continues_from_its_finished_cells(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--tiny", "--out", str(out), "--no-progress", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "transpeft_kernels", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out.glob("scores/*/test_k0/*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)  # after the first test score: adapters and snapshot finished, not the rest
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
    assert killed, "the demo finished before the kill"
    assert not (out / "results.json").exists()
    before = _demo_cells(out)
    assert before
    threads = torch.get_num_threads()
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    after = _demo_cells(out)
    for f, stamp in before.items():
        assert after.get(f) == stamp, f"{f} was recomputed"
    assert len(after) > len(before)
    first = json.loads((out / "results.json").read_text())
    fresh = tmp_path / "fresh"
    try:
        assert cli.main([*args[:2], "--out", str(fresh), *args[4:]]) == 0
    finally:
        torch.set_num_threads(threads)
    again = json.loads((fresh / "results.json").read_text())
    assert [(r["adapter"], r["base"], r["accuracy"]) for r in first["rows"]] == \
        [(r["adapter"], r["base"], r["accuracy"]) for r in again["rows"]]
    assert [r["loss"] for r in first["rows"]] == pytest.approx([r["loss"] for r in again["rows"]], rel=1e-5)


# ---- the benchmark runner keeps finished cases -----------------------------------------------------
def test_bench_resume_keeps_finished_cases_and_drops_a_torn_line(tmp_path, monkeypatch):
    from transpeft_kernels.bench import cases
    from transpeft_kernels.bench.records import read_jsonl
    from transpeft_kernels.provenance import COMMIT_ENV

    monkeypatch.setenv(COMMIT_ENV, "under-test")  # records of other code are not resumed; a commit meanwhile is not this test's
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
    # records of another set of implementations are not this run's finished cells
    from transpeft_kernels.bench.records import environment
    from transpeft_kernels.bench.suite import _finished, select

    sel, env = select(preset, ("lora_linear",)), environment(torch.device("cpu"))
    assert set(_finished(tmp_path / "results.jsonl", sel, ("vanilla", "torch"), env, preset)) == set(keys)
    assert _finished(tmp_path / "results.jsonl", sel, ("vanilla", "torch", "floor"), env, preset) == {}
