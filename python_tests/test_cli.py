"""The command line, run as a user would: the quickstart job, the default command, one-line errors, the demo
and the study without matplotlib."""
import subprocess
import sys


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "transpeft_kernels", *args], capture_output=True, text=True, timeout=timeout)


def test_quickstart_runs_and_reports():
    proc = _run("quickstart", "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "patched 4 MLPs of LlamaForCausalLM" in out
    assert "gate_proj     fused   4" in out
    assert "eval logits with and without the patch identical: True" in out


def test_bad_setting_is_a_one_line_error():
    proc = _run("quickstart", "--masking", "1.5")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("transpeft: error: masking")
    assert "Traceback" not in proc.stderr


def test_default_command_is_the_demo(tmp_path):
    # Options without a command go to the demo; a bad --out is rejected before anything is loaded.
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    proc = _run("--quick", "--out", str(not_a_dir))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("transpeft: error: --out")
    assert "Traceback" not in proc.stderr


# Without matplotlib (hidden from the import system: sys.modules entries of None make `import` raise ImportError),
# the demo and the study write everything else and say in one line how to get the chart.
_HIDE_MATPLOTLIB = ("import sys; sys.modules.update(dict.fromkeys(['matplotlib', 'matplotlib.pyplot'])); "
                    "from transpeft_kernels import cli; sys.exit(cli.main(sys.argv[1:]))")


def _run_without_matplotlib(*args, timeout=300):
    return subprocess.run([sys.executable, "-c", _HIDE_MATPLOTLIB, *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_without_matplotlib_writes_everything_else_and_says_how_to_get_the_chart(tmp_path):
    import json

    out = tmp_path / "demo"
    proc = _run_without_matplotlib("demo", "--tiny", "--out", str(out), "--no-progress", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    hints = [line for line in lines if "install matplotlib" in line]
    assert len(hints) == 1 and "pip install matplotlib" in hints[0], hints
    assert lines[-1].startswith("On the facts task") and "full study" in lines[-1]  # the answer comes last
    res = json.loads((out / "results.json").read_text())
    assert res["rows"] and res["answer"] == lines[-1]
    assert (out / "study.json").is_file()
    assert not (out / "results.png").exists() and not (out / "study.png").exists()


def test_study_without_matplotlib_writes_study_json_and_says_how_to_get_the_chart(tmp_path):
    out = tmp_path / "study"
    proc = _run_without_matplotlib("study", "--preset", "tiny", "--seeds", "1", "--out", str(out), "--no-progress",
                                   "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hints = [line for line in proc.stdout.splitlines() if "install matplotlib" in line]
    assert len(hints) == 1 and "pip install matplotlib" in hints[0] and "--chart-from" in hints[0], hints
    assert (out / "study.json").is_file() and not (out / "study.png").exists()
    # redrawing the chart needs matplotlib: one line, exit 2
    redraw = _run_without_matplotlib("study", "--chart-from", str(out / "study.json"))
    assert redraw.returncode == 2 and "Traceback" not in redraw.stderr
    assert redraw.stderr.strip().splitlines()[-1] == \
        "transpeft: error: --chart-from: matplotlib is not installed: pip install matplotlib"
