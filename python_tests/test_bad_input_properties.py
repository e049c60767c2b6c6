"""Bad input, tried broadly (property-based, bounded and deterministic): every ``patch()`` argument and
the ``train``/``transfer`` inputs. Each bad value gives one error naming the problem (for the CLIs: one
``transpeft: error:`` line, exit status 2, no traceback), and leaves the model and the files as they were."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import transpeft_kernels as tpk  # noqa: E402
from helpers import lora_model  # noqa: E402
from transpeft_kernels import cli  # noqa: E402
from transpeft_kernels.integration import patch_settings  # noqa: E402

pytest.importorskip("peft")
BOUNDED = settings(max_examples=40, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ROOT = Path(__file__).resolve().parent.parent

# ---- patch() ---------------------------------------------------------------------------------------
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-3, 5), max_size=3), st.sampled_from(["auto", "torch", "tpu", ""]),
)
ARGUMENTS = ("masking", "dropping", "mask_scale", "backend", "layers")


def _valid(name, value, n_layers) -> bool:
    if name in ("masking", "dropping"):
        hi_ok = (lambda v: v <= 1.0) if name == "dropping" else (lambda v: v < 1.0)
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
                and 0.0 <= value and hi_ok(value))
    if name == "mask_scale":
        return isinstance(value, bool)
    if name == "backend":
        return value in ("auto", "torch")
    if name == "layers":
        return value is None or (isinstance(value, list) and len(value) > 0 and len(set(value)) == len(value)
                                 and all(0 <= i < n_layers for i in value))
    raise AssertionError(name)


@pytest.fixture(scope="module")
def model():
    m = lora_model("llama")
    tpk.patch(m, masking=0.1, dropping=0.1, layers=[0])
    return m


def _snapshot(m):
    return ({i: (r.settings, r.layer_index) for i, r in patch_settings(m).items()},
            {n: p.detach().clone() for n, p in m.state_dict().items()},
            {id(mod): mod.__dict__.get("forward") for mod in m.modules()})


@BOUNDED
@given(name=st.sampled_from(ARGUMENTS), value=ANY_VALUE)
def test_patch_accepts_valid_values_and_rejects_others_cleanly(model, name, value):
    n_layers = len(model.get_base_model().model.layers)
    before = _snapshot(model)
    if _valid(name, value, n_layers):
        tpk.patch(model, **{name: value})
        tpk.patch(model, masking=0.1, dropping=0.1, layers=[0])  # back to the fixture's state
        return
    with pytest.raises((TypeError, ValueError)) as info:
        tpk.patch(model, **{name: value})
    message = str(info.value)
    assert name in message and "\n" not in message, message  # names the argument, one line
    after = _snapshot(model)
    assert after[0] == before[0]  # the same patched layers and settings
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in after[1])
    assert after[2] == before[2]  # no forward replaced or restored


def test_patch_rejects_unknown_keywords(model):
    with pytest.raises(TypeError, match="masks"):
        tpk.patch(model, masks=0.1)


# ---- the command line ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from test_workflow import _pairs, _save_base, _write_jsonl
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("props")
    ns = type("Files", (), {})()
    ns.root = root
    ns.base = _save_base(root / "bäse dir", seed=0)  # a unicode path with a space
    ns.new = _save_base(root / "new base", seed=1)
    ns.data = _write_jsonl(root / "data ü.jsonl", _pairs(8))
    ns.adapter = root / "adäpter"
    get_peft_model(tiny_model("llama", seed=0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(ns.adapter)
    return ns


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _one_line(capsys, rc, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("transpeft: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5),
                         st.lists(st.integers(), max_size=2))
BAD_RECORD = st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "completion", "text", "other"]), JSON_SCALARS, max_size=3),
    JSON_SCALARS,
)


def _bad_line(draw_record, draw_cut):
    text = json.dumps(draw_record)
    return text[:draw_cut] if draw_cut is not None else text


@BOUNDED
@given(records=st.lists(BAD_RECORD, min_size=0, max_size=4), cut=st.one_of(st.none(), st.integers(0, 12)),
       raw=st.sampled_from([None, b"", b"   \n\n", b"\xff\xfe\x00bad", b'{"prompt": "a", "completion": "b"']))
def test_train_rejects_random_bad_jsonl_in_one_line(files, capsys, tmp_path_factory, records, cut, raw):
    data = tmp_path_factory.mktemp("d") / "data.jsonl"
    if raw is not None:
        data.write_bytes(raw)
    else:
        lines = [json.dumps(r) for r in records]
        if cut is not None and lines:
            lines[-1] = lines[-1][:cut]  # a truncated last line
        data.write_text("\n".join(lines) + ("\n" if lines else ""))
    from transpeft_kernels.errors import UserError
    from transpeft_kernels.workflow.data import load_jsonl

    try:
        load_jsonl(data, "--data")
        return  # a valid file (hypothesis found a well-formed record set): nothing to reject
    except UserError:
        pass
    before = _digest(data)
    out = data.parent / "out"
    rc = cli.main(["train", "--base", str(files.base), "--data", str(data), "--out", str(out), "--no-progress",
                   "--max-steps", "1"])
    _one_line(capsys, rc, "--data")
    assert _digest(data) == before and not out.exists()


@BOUNDED
@given(cut=st.integers(0, 4000), header=st.sampled_from([None, b"\x00" * 8, b"\xff" * 8, b"{}{}{}{}"]))
def test_transfer_rejects_truncated_or_corrupt_adapter_weights(files, capsys, tmp_path_factory, cut, header):
    adapter = tmp_path_factory.mktemp("a") / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((files.adapter / "adapter_config.json").read_bytes())
    weights = (files.adapter / "adapter_model.safetensors").read_bytes()
    damaged = (header + weights[8:]) if header is not None else weights[: min(cut, len(weights) - 1)]
    (adapter / "adapter_model.safetensors").write_bytes(damaged)
    before = _digest(adapter)
    rc = cli.main(["transfer", "--old-base", str(files.base), "--new-base", str(files.new), "--data", str(files.data),
                   "--no-progress", str(adapter)])
    _one_line(capsys, rc, "adapter")
    assert _digest(adapter) == before


@BOUNDED
@given(config=st.one_of(st.text(max_size=20), st.dictionaries(st.sampled_from(["r", "target_modules", "peft_type",
                                                                                "lora_alpha"]), JSON_SCALARS, max_size=3)))
def test_transfer_rejects_bad_adapter_configs(files, capsys, tmp_path_factory, config):
    adapter = tmp_path_factory.mktemp("c") / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes((files.adapter / "adapter_model.safetensors").read_bytes())
    (adapter / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    rc = cli.main(["transfer", "--old-base", str(files.base), "--new-base", str(files.new), "--data", str(files.data),
                   "--no-progress", str(adapter)])
    if rc == 0:  # a config PEFT accepts after all (e.g. only harmless keys changed)
        capsys.readouterr()
        return
    _one_line(capsys, rc, "adapter")


def test_read_only_output_folder_fails_in_one_line(files, capsys, tmp_path):
    ro = tmp_path / "read only"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: a file where the folder should be instead
            os.chmod(ro, 0o700)
            blocker = ro / "out"
            blocker.write_text("not a directory")
            rc = cli.main(["train", "--base", str(files.base), "--data", str(files.data), "--out", str(blocker / "x"),
                           "--no-progress", "--max-steps", "1"])
            _one_line(capsys, rc, "--out")
            assert blocker.read_text() == "not a directory"
            return
        rc = cli.main(["train", "--base", str(files.base), "--data", str(files.data), "--out", str(ro / "out"),
                       "--no-progress", "--max-steps", "1"])
        _one_line(capsys, rc, "--out")
    finally:
        os.chmod(ro, 0o700)


def test_unicode_paths_work_end_to_end(files, tmp_path, capsys):
    out = tmp_path / "ädapter öut"
    assert cli.main(["train", "--base", str(files.base), "--data", str(files.data), "--out", str(out), "--no-progress",
                     "--max-steps", "1", "--masking", "0.1"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_a_subprocess_error_has_no_traceback(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1, "completion": [2]}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRANSPEFT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "transpeft_kernels", "train", "--base", str(files.base), "--data",
                           str(bad), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [proc.stderr.strip()]
    assert proc.stderr.startswith("transpeft: error: --data")
