"""The README's main job, run as a user would."""
import subprocess
import sys


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "transpeft_kernels", *args], capture_output=True, text=True, timeout=timeout)


def test_quickstart_runs_and_reports():
    proc = _run("--steps", "3")
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
