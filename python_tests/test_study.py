"""The transfer study (``study`` command) on the tiny preset: every cell in study.json, a killed run resumed
without recomputing its finished cells, the paired bootstrap on known cases, the selection rule, the
weight-change measure, and one-line errors for bad arguments."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from transpeft_kernels import cli
from transpeft_kernels.workflow import stats
from transpeft_kernels.workflow.study import (METHODS, PRESETS, count_cells, select_setting, weight_change)

ROOT = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]


def _cells_on_disk(out: Path) -> dict[Path, tuple[int, int]]:
    """Every finished cell file: snapshots and their measures, adapters, per-item scores."""
    files = [*out.glob("update/step_*"), *out.glob("adapters/*/*/info.json"),
             *out.glob("adapters/*/*/adapter_model.safetensors"), *out.glob("scores/*/*/*.json")]
    return {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}


def _study(out: Path, *extra: str) -> list[str]:
    return ["study", "--preset", "tiny", "--out", str(out), "--threads", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A tiny study SIGKILLed twice (once its first snapshot is written, once three more scores are), then
    finished in-process; with the finished cells' stamps seen after each kill."""
    out = tmp_path_factory.mktemp("study") / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    stamps, kills = [], 0
    scores = lambda: len(list(out.glob("scores/*/*/*.json")))  # noqa: E731
    for ready in (lambda: (out / "update" / "step_1.safetensors").exists(),
                  lambda: scores() >= scored + 3):
        scored = scores()
        proc = subprocess.Popen([sys.executable, "-m", "transpeft_kernels", *_study(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
        stamps.append(_cells_on_disk(out))
    assert _main(_study(out)) == 0
    return out, stamps, kills


def _main(args: list[str]) -> int:
    """The command in this process, without leaving its --threads setting to the tests that follow."""
    threads = torch.get_num_threads()
    try:
        return cli.main(args)
    finally:
        torch.set_num_threads(threads)


def test_every_cell_is_in_study_json(resumed):
    out, _, _ = resumed
    study = json.loads((out / "study.json").read_text())
    seeds, group = study["seeds"], "facts+words"
    chosen = study["selection"][group]["chosen"]
    tp = f"tp_m{chosen['masking']:g}_d{chosen['dropping']:g}"
    cells = {(c["task"], c["split"], c["snapshot"], c["adapter"]) for c in study["cells"]}
    for task in ("facts", "words"):
        for m in TINY.grid_masking:  # every grid setting scored on dev, on the old base only
            for d in TINY.grid_dropping:
                assert (task, "dev", 0, f"tp_m{m:g}_d{d:g}_s0") in cells
        assert not any(split == "dev" and k > 0 for _, split, k, _ in cells)
        for k in TINY.snapshots:
            for s in range(seeds):
                assert (task, "test", k, f"vanilla_s{s}") in cells
                assert (task, "test", k, f"{tp}_s{s}") in cells
            if k:
                assert (task, "test", k, f"retuned_k{k}_s0") in cells
            for method in METHODS:
                row = next(r for r in study["results"] if r["task"] == task and r["snapshot"] == k
                           and r["method"] == method)
                assert set(row["accuracy"]) == {"mean", "low", "high"}
                assert row["seeds"] == (1 if method == "retuned" else seeds)
                assert row["items"] == next(t.n_test for t in TINY.tasks if t.name == task)
                assert ("gap_closed" in row) == (method == "trans-peft" and k > 0)
                assert ("retention_minus_vanilla" in row) == (method == "trans-peft" and k > 0)
    assert [s["step"] for s in study["update"]["snapshots"]] == list(TINY.snapshots)
    for s in study["update"]["snapshots"][1:]:
        assert set(s["weight_change"]) >= {"q", "k", "v", "o", "gate", "up", "down", "attention", "ffn"}
        assert s["weight_change"]["ffn"] > 0
    assert study["protocol"] and study["selection"][group]["candidates"]
    env = study["environment"]
    assert env["commit"] and env["torch"] and env["cpu"] and env["cpu_threads"] == 1
    assert (out / "study.png").stat().st_size > 0
    assert not (out / "update" / "state.pt").exists()
    assert study["cells_reused"] + study["cells_computed"] == count_cells(TINY, seeds)


def test_a_killed_study_resumes_without_recomputing_finished_cells(resumed):
    out, stamps, kills = resumed
    assert kills >= 1
    final = _cells_on_disk(out)
    for seen in stamps:
        assert seen, "a kill came before any cell was finished"
        for f, stamp in seen.items():
            assert final.get(f) == stamp, f"{f} was recomputed"
    study = json.loads((out / "study.json").read_text())
    assert study["cells_reused"] >= len({f for f in stamps[-1] if f.suffix == ".json" and "scores" in f.parts})


def test_resumed_study_matches_an_uninterrupted_one(resumed, tmp_path):
    out, _, _ = resumed
    fresh = tmp_path / "fresh"
    assert _main(_study(fresh)) == 0
    a, b = (json.loads((d / "study.json").read_text()) for d in (out, fresh))
    key = lambda c: (c["task"], c["split"], c["snapshot"], c["adapter"])  # noqa: E731
    assert sorted(map(key, a["cells"])) == sorted(map(key, b["cells"]))
    for ca, cb in zip(sorted(a["cells"], key=key), sorted(b["cells"], key=key)):
        assert ca["accuracy"] == cb["accuracy"]
        assert ca["loss"] == pytest.approx(cb["loss"], rel=1e-5)


def test_the_update_resumes_from_its_last_snapshot_with_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from transpeft_kernels.workflow import study as st
    from transpeft_kernels.workflow.bases import demo_old_base

    old, tok, _, _ = demo_old_base(True, 0, log=lambda *a: None)
    quiet = st._Cells(100, log=lambda *a: None)
    whole, cut = st._Layout(tmp_path / "whole"), st._Layout(tmp_path / "cut")
    st.run_update(old, tok, TINY, whole, torch.device("cpu"), quiet, False, quiet.log)
    saves, real_save = [], st._save_weights

    def save_then_die(model, path):
        if saves:
            raise KeyboardInterrupt  # as a kill after the first snapshot and its optimizer state
        saves.append(path)
        real_save(model, path)

    monkeypatch.setattr(st, "_save_weights", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        st.run_update(old, tok, TINY, cut, torch.device("cpu"), quiet, False, quiet.log)
    first = cut.snapshot(TINY.snapshots[1])
    assert cut.update_state.is_file() and saves == [first]
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(st, "_save_weights", real_save)
    st.run_update(old, tok, TINY, cut, torch.device("cpu"), quiet, False, quiet.log)
    assert first.stat().st_mtime_ns == stamp and not cut.update_state.exists()
    for k in TINY.snapshots[1:]:
        a, b = load_file(str(whole.snapshot(k))), load_file(str(cut.snapshot(k)))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ---- the bootstrap -----------------------------------------------------------------------------------

def test_bootstrap_all_correct_and_all_wrong_are_exact():
    ones, zeros = np.ones((3, 50)), np.zeros((3, 50))
    assert stats.mean_ci(ones).to_json() == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert stats.mean_ci(zeros).to_json() == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert stats.ratio_ci(ones, ones).to_json() == {"mean": 1.0, "low": 1.0, "high": 1.0}
    ratio = stats.ratio_ci(ones, zeros)  # undefined in every draw
    assert ratio.mean is None and ratio.low is None and ratio.high is None


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 1600):
        x = (rng.random((3, n)) < 0.7).astype(float)
        e = stats.mean_ci(x, draws=1000, seed=3)
        assert e.low < e.mean < e.high and e.mean == pytest.approx(x.mean())
        widths.append(e.high - e.low)
    assert widths[1] < widths[0] / 2.5  # about 1/sqrt(16) of the width
    # the binomial standard error: the 95% interval of 0.7 on 300 Bernoulli items is about +-0.052
    x = (rng.random((1, 300)) < 0.7).astype(float)
    e = stats.mean_ci(x, draws=4000, seed=0)
    assert (e.high - e.low) / 2 == pytest.approx(1.96 * (x.mean() * (1 - x.mean()) / 300) ** 0.5, rel=0.15)
    assert stats.mean_ci(x, seed=5).to_json() == stats.mean_ci(x, seed=5).to_json()  # seeded


def test_bootstrap_is_paired():
    rng = np.random.default_rng(0)
    v = (rng.random((3, 400)) < 0.5).astype(float)
    t = v.copy()
    t[:, :40] = 1.0  # the same items plus 40 more right in every seed
    d = stats.bootstrap({"t": t, "v": v}, lambda m: m["t"] - m["v"])
    unpaired = stats.bootstrap({"t": t[:, rng.permutation(400)], "v": v}, lambda m: m["t"] - m["v"])
    assert d.low > 0 and d.mean == pytest.approx((t - v).mean())
    assert d.high - d.low < (unpaired.high - unpaired.low) / 2
    # gap closed: trans-peft halfway between vanilla and the re-tuned adapter
    r = np.ones((1, 400))
    half = np.where(rng.random((3, 400)) < 0.5, v, 1.0)
    g = stats.gap_closed_ci(half, v, r)
    assert g.low < g.mean < g.high and 0.3 < g.mean < 0.7


def test_retention_difference_on_a_known_case():
    rng = np.random.default_rng(2)
    old = (rng.random((1, 500)) < 0.6).astype(float)
    right = np.flatnonzero(old[0])
    tp_new, v_new = old.copy(), old.copy()
    v_new[0, right[:60]] = 0.0   # vanilla forgets 60 of its ~300 right answers, Trans-PEFT 15 of the same
    tp_new[0, right[:15]] = 0.0
    d = stats.retention_difference_ci(tp_new, old, v_new, old)
    assert d.mean == pytest.approx(45 / old.sum())
    assert 0 < d.low < d.mean < d.high  # paired: the shared items cancel, a 15-point gap is clear on 500 items
    same = stats.retention_difference_ci(v_new, old, v_new, old)
    assert same.to_json() == {"mean": 0.0, "low": 0.0, "high": 0.0}


def test_bootstrap_resamples_seeds_too():
    items = np.tile((np.arange(200) % 2).astype(float), (4, 1))
    same = stats.mean_ci(items)
    shifted = items.copy()
    shifted[0] = 1.0  # one seed much better than the others: seed resampling must widen the interval
    assert (stats.mean_ci(shifted).high - stats.mean_ci(shifted).low) > 2 * (same.high - same.low)
    with pytest.raises(ValueError):
        stats.bootstrap({"a": np.ones((1, 3)), "b": np.ones((1, 4))}, lambda m: m["a"])


# ---- the protocol ------------------------------------------------------------------------------------

def test_selection_takes_the_strongest_setting_within_the_tolerance():
    grid = [(0.02, 0.0, 0.69), (0.02, 0.02, 0.67), (0.05, 0.0, 0.685), (0.05, 0.02, 0.60), (0.1, 0.0, 0.55),
            (0.1, 0.02, 0.50)]
    assert select_setting(0.70, grid) == (0.05, 0.0, True)
    assert select_setting(0.70, grid, tolerance=0.1) == (0.05, 0.02, True)   # masking first, then dropping
    assert select_setting(0.70, grid, tolerance=0.2) == (0.1, 0.02, True)
    assert select_setting(0.60, grid) == (0.05, 0.02, True)
    # exactly 2 points below counts as within
    assert select_setting(0.70, [(0.02, 0.0, 0.68), (0.05, 0.0, 0.679)]) == (0.02, 0.0, True)
    # above vanilla qualifies too
    assert select_setting(0.50, [(0.1, 0.0, 0.58)]) == (0.1, 0.0, True)
    # none within: the best dev accuracy, the weaker setting on ties, flagged
    assert select_setting(0.90, grid) == (0.02, 0.0, False)
    assert select_setting(0.90, [(0.05, 0.0, 0.5), (0.02, 0.02, 0.5)]) == (0.02, 0.02, False)
    with pytest.raises(ValueError):
        select_setting(0.5, [])


def test_weight_change_per_module_kind():
    from transpeft_kernels.workflow.bases import config_built_model

    model = config_built_model(40, seed=0, hidden=16, layers=2)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name:
                p.mul_(1.1)
            elif "q_proj" in name:
                p.add_(0.01 * p)
    change = weight_change(old, model.state_dict())
    assert change["ffn"] == pytest.approx(0.1, rel=1e-4) and change["gate"] == pytest.approx(0.1, rel=1e-4)
    assert change["q"] == pytest.approx(0.01, rel=1e-3) and change["k"] == 0.0 and change["embedding"] == 0.0
    assert 0 < change["attention"] < 0.01


# ---- bad arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, start", [
    (["--preset", "huge"], "--preset"),
    (["--preset", "tiny", "--seeds", "0"], "--seeds"),
    (["--preset", "tiny", "--seeds", "three"], "--seeds"),
    (["--preset", "tiny", "--threads", "-1"], "--threads"),
    (["--preset", "tiny", "--out", "FILE"], "--out"),
    (["--chart-from", "MISSING"], "--chart-from"),
])
def test_bad_arguments_fail_in_one_line_before_any_work(args, start, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    args = [str(tmp_path / "file") if a == "FILE" else str(tmp_path / "nope.json") if a == "MISSING" else a
            for a in args]
    if "--out" not in args and "--chart-from" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert cli.main(["study", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"transpeft: error: {start}")
    assert not (tmp_path / "out").exists()


def test_another_presets_output_is_refused(resumed, capsys):
    out, _, _ = resumed
    before = _cells_on_disk(out)
    assert cli.main(["study", "--preset", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]
    assert _cells_on_disk(out) == before


def test_bad_arguments_exit_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "transpeft_kernels", "study", "--preset", "tiny", "--seeds", "-2",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["transpeft: error: --seeds: expected a positive integer, got -2"]
    assert not (tmp_path / "o").exists()
