"""The benchmark suite: the smoke configuration through the CLI, and the timing/record/chart pieces."""
import math
import subprocess
import sys

import pytest
import torch

from transpeft_kernels.bench import cases, numerics, records, table, timing
from transpeft_kernels.bench.chart import write_chart
from transpeft_kernels.bench.impls import IMPL_NAMES, Impl, build_impl, build_setup


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "transpeft_kernels", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_run_writes_sane_records_and_a_chart(tmp_path):
    proc = _cli("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SMOKE RUN" in proc.stdout and "GPU figures need a GPU" in proc.stdout
    recs = records.read_jsonl(tmp_path / "results.jsonl")
    assert {r["op"] for r in recs} == {"lora_linear", "gated_mlp", "train_step"}
    assert {r["pass"] for r in recs} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["impl"] for r in recs} == set(IMPL_NAMES)
    for r in recs:
        missing = [f for f in records.REQUIRED_FIELDS if f not in r]
        assert not missing, (missing, r)
        assert r["torch"] == torch.__version__ and r["commit"] and r["gpu"] is None and r["preset"] == "smoke"
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"] and r["median_ms"] is None
            continue
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert r["speedup_vs_vanilla"] > 0
        if r["impl"] == "vanilla":
            assert r["speedup_vs_vanilla"] == 1.0
        if r["impl"] != "floor":
            assert r["saved_bytes"] > 0
        if r["impl"] != "floor" and (r["op"], r["impl"]) != ("train_step", "vanilla"):  # the train baseline is the reference
            assert 0 <= r["numerics_rel_err"] < 0.05, r
        if r["op"] == "train_step":
            assert r["tokens_per_s"] == pytest.approx(r["M"] / (r["median_ms"] / 1e3), rel=1e-3)
    # Both vanilla and our path are measured on every op, side by side.
    for op in ("lora_linear", "gated_mlp", "train_step"):
        ok = {r["impl"] for r in recs if r["op"] == op and r["status"] == "ok"}
        assert {"vanilla", "torch"} <= ok, (op, ok)
    # Backends that cannot run here are listed as skipped, with the reason.
    assert all(r["status"] == "skipped" for r in recs if r["impl"] == "cuda")
    # the TF32 case: its own records and table rows (torch's fp32 matmul setting during the case)
    tf32 = [r for r in recs if r.get("fp32_matmul") == "tf32"]
    assert tf32 and {r["op"] for r in tf32} == {"gated_mlp"} and all(r["case_key"].endswith(" tf32") for r in tf32)
    assert {r["fp32_matmul"] for r in recs if r["op"] != "train_step"} == {"ieee", "tf32"}
    assert " tf32 " in (tmp_path / "table.txt").read_text()
    png = tmp_path / "speedup.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vanilla ms" in (tmp_path / "table.txt").read_text()


def _cli_in_process(capsys, *args):
    from transpeft_kernels.cli import main

    rc = main(["bench", *args])
    return rc, capsys.readouterr().err.strip().splitlines()[-1]


def test_without_a_gpu_the_default_preset_is_a_one_line_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, last = _cli_in_process(capsys, "--out", str(tmp_path))
    assert rc == 2
    assert last.startswith("transpeft: error: no CUDA GPU here: GPU figures need a GPU")


@pytest.mark.parametrize("args,expected", [
    (("--smoke", "--impls", "floor"), "impls: must include 'vanilla'"),
    (("--smoke", "--impls", "vanilla", "fast"), "impls: expected names from"),
    (("--smoke", "--ops", "attention"), "ops: expected names from"),
    (("--smoke", "--preset", "gpu"), "--smoke and --preset gpu"),
    (("--smoke", "--budget-s", "0"), "--budget-s: expected a positive number"),
    (("--chart-from", "does-not-exist.jsonl"), "--chart-from: no such file"),
])
def test_bad_arguments_name_themselves(tmp_path, capsys, args, expected):
    rc, last = _cli_in_process(capsys, *args, "--out", str(tmp_path))
    assert rc == 2
    assert expected in last


# ---- timing --------------------------------------------------------------------------------------
def test_timing_median_and_spread():
    t = timing.Timing((5.0, 1.0, 3.0, 2.0, 4.0), "perf_counter", 1)
    assert t.median_ms == 3.0
    assert t.iqr_ms > 0
    assert timing.Timing((1.0, 9.0), "perf_counter", 1).median_ms == 5.0


def test_time_calls_warms_up_rotates_buffers_and_keeps_prepare_untimed():
    seen, prepared = [], []
    t = timing.time_calls(seen.append, torch.device("cpu"), warmup=2, reps=5, buffers=3)
    assert seen == [0, 1, 0, 1, 2, 0, 1] and len(t.times_ms) == 5 and t.method == "perf_counter"

    def prepare(i):
        prepared.append(i)
        return ("graph", i)

    calls = []
    timing.time_calls(calls.append, torch.device("cpu"), warmup=1, reps=3, buffers=2, prepare=prepare)
    assert prepared == [0, 0, 1, 0] and calls == [("graph", 0), ("graph", 0), ("graph", 1), ("graph", 0)]


def test_time_calls_rejects_bad_counts():
    with pytest.raises(ValueError, match="reps"):
        timing.time_calls(lambda i: None, torch.device("cpu"), warmup=0, reps=0)
    with pytest.raises(ValueError, match="buffers"):
        timing.time_calls(lambda i: None, torch.device("cpu"), warmup=0, reps=1, buffers=0)
    with pytest.raises(ValueError, match="bytes_per_call"):
        timing.buffer_count(0, torch.device("cpu"))
    assert timing.buffer_count(10, torch.device("cpu")) == 1  # no L2 to defeat on CPU


# ---- records, table, chart -----------------------------------------------------------------------
def _rec(impl, ms, status="ok"):
    env = {"gpu": "Test GPU", "torch": "x", "commit": "abc"}
    return records.make_record(env, "gpu", op="gated_mlp", impl=impl, status=status, median_ms=ms, M=8, d=4, I=16, r=2,
                               model="m", label="d=4,I=16", lora_dropout=0.0, **{"pass": "fwd+bwd"})


def test_speedups_are_vanilla_over_own_median():
    recs = [_rec("vanilla", 10.0), _rec("torch", 4.0), _rec("floor", 2.0), _rec("triton", None, "skipped")]
    records.add_speedups(recs)
    assert [r["speedup_vs_vanilla"] for r in recs] == [1.0, 2.5, 5.0, None]
    assert all(k in recs[0] for k in records.REQUIRED_FIELDS)
    text = table.records_table(recs)
    assert "4.000 (2.50x)" in text and "10.000" in text
    assert any("Test GPU" in line for line in table.summary_lines(recs))


def test_jsonl_round_trip_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    records.append_jsonl(path, [_rec("vanilla", 1.0), _rec("torch", 0.5)])
    with path.open("a") as f:
        f.write('{"op": "gated_ml')  # a run killed mid-write
    assert [r["impl"] for r in records.read_jsonl(path)] == ["vanilla", "torch"]


def test_commit_from_env_or_file(tmp_path, monkeypatch):
    from transpeft_kernels import provenance

    monkeypatch.setenv(provenance.COMMIT_ENV, "deadbeef")
    assert records.commit(tmp_path) == "deadbeef"
    monkeypatch.delenv(provenance.COMMIT_ENV)
    (tmp_path / provenance.COMMIT_FILE).write_text("cafe123\n")
    assert records.commit(tmp_path) == "cafe123"
    (tmp_path / provenance.COMMIT_FILE).unlink()
    assert records.commit(tmp_path) == "unknown"  # not a git checkout


def test_chart_falls_back_to_svg_without_matplotlib(tmp_path, monkeypatch):
    recs = [_rec("vanilla", 10.0), _rec("torch", 4.0), _rec("floor", 2.0)]
    records.add_speedups(recs)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = write_chart(recs, tmp_path)
    assert path.name == "speedup.svg"
    svg = path.read_text()
    assert svg.startswith("<svg") and "torch 2.50x" in svg and "floor 5.00x" in svg


def test_chart_without_measurements_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no measured speedups"):
        write_chart([_rec("vanilla", 1.0), _rec("torch", None, "skipped")], tmp_path)


# ---- numerics check ------------------------------------------------------------------------------
def _tiny_case(op, q):
    n, inter = (24, None) if op == "lora_linear" else (None, 40)
    return cases.OpCase(op, "tiny", "t", 16, 32, n, inter, 4, q, 0.1 if op == "gated_mlp" else 0.0, dtype="float32")


@pytest.mark.parametrize("op", ["lora_linear", "gated_mlp"])
def test_numerics_check_passes_good_and_catches_bad_implementations(op):
    setup = build_setup(_tiny_case(op, 0.05), torch.device("cpu"))
    for name in ("vanilla", "torch"):
        result = numerics.check(build_impl(name, setup), setup, tokens=16)
        assert result.max_rel_err < numerics.TOLERANCE[torch.float32]
    good = build_impl("torch", setup)
    off = Impl("scaled", lambda x: good.forward(x) * 1.01, lambda x: good.check_forward(x) * 1.01, check_random=True)
    with pytest.raises(numerics.NumericsMismatch, match="scaled"):
        numerics.check(off, setup, tokens=16)
    # A different mask (another seed) is a mismatch too: the check compares masks, not only shapes.
    other_seed = Impl("reseeded", good.forward, lambda x: good.forward(x, torch.tensor(99)), check_random=True)
    with pytest.raises(numerics.NumericsMismatch):
        numerics.check(other_seed, setup, tokens=16)
