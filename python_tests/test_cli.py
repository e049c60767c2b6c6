"""The command line, run as a user would: the quickstart job, the default command, one-line errors."""
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
