"""Bad input, tried broadly: property-based tests (hypothesis) of ``patch()`` and of the command line.

patch(): any value of any argument either patches (when valid) or raises TypeError/ValueError (RuntimeError
for a backend that cannot run here) whose message starts with the argument's name and says what it accepts,
and the model is left exactly as it was: the same forward callables, state dict, flags and no patch record.

train / transfer / demo: any bad input gives exit status 2 and one ``transpeft: error: ...`` line naming the
problem (the argument, the file, the line), no traceback; the input files are left as they were (hashed before
and after) and nothing is written. Most runs are in-process (``cli.main``); subprocesses check what only a
real process shows (no traceback on the way out; a read-only directory, which root can write unless the
capability to ignore permission bits is dropped).

Every property runs a bounded, derandomized number of examples, so the suite is deterministic.
"""
import hashlib
import json
import math
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import transpeft_kernels as tpk  # noqa: E402
from helpers import lora_model  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transpeft_kernels import cli  # noqa: E402
from transpeft_kernels.integration import patch_settings  # noqa: E402
from transpeft_kernels.ops.backends import BACKEND_NAMES, runnable_backends  # noqa: E402


def bounded(n: int):
    """``n`` examples, the same ones on every run (derandomize; no example database), no per-example deadline."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def escaped(text: str) -> str:
    """How a one-line error shows ``text`` (a path): unprintable characters as escapes."""
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in text)


# ---- patch() ----------------------------------------------------------------------------------------------

ARGUMENTS = ("masking", "dropping", "mask_scale", "backend", "layers")
N_LAYERS = 2  # every tiny model


class Opaque:
    def __repr__(self):
        return "Opaque()"


def _odd_values():
    import decimal
    import fractions

    values = [None, Opaque(), float, [0.1], (0.1,), {"p": 0.1}, b"0.1", 0.1 + 0j, fractions.Fraction(1, 10),
              decimal.Decimal("0.1"), torch.tensor(0.1), torch.tensor([0, 1]), "0.1", "", "nan"]
    try:
        import numpy as np

        values += [np.float32(0.1), np.float64(0.1), np.int64(0), np.bool_(True), np.array([0, 1])]
    except ImportError:
        pass
    return values


ODD = st.sampled_from(_odd_values())
HUGE = st.sampled_from([10**400, -(10**400), 2**1024, 2**63])
PROBABILITY = st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2),
                        HUGE, st.booleans(), st.text(max_size=4), ODD)
MASK_SCALE = st.one_of(st.booleans(), st.integers(0, 1), st.floats(0, 1), st.none(), st.text(max_size=3), ODD)
BACKEND = st.one_of(st.sampled_from([*BACKEND_NAMES, "AUTO", " torch", "torch ", "", "jax", "cpu"]),
                    st.text(max_size=6), st.none(), st.integers(), ODD)
INDEX = st.one_of(st.integers(-3, 4), st.booleans(), st.floats(0, 1), st.none(), st.text(max_size=1), HUGE, ODD)
LAYERS = st.one_of(st.none(), st.lists(st.integers(0, N_LAYERS - 1), min_size=1, max_size=3),
                   st.lists(INDEX, max_size=3), st.lists(INDEX, max_size=3).map(tuple),
                   st.sampled_from([range(N_LAYERS), range(5), range(0), {0}, {1: "x"}, "01", b"\x00"]),
                   st.integers(-1, 3), st.floats(), ODD)
UNKNOWN = st.dictionaries(st.sampled_from(["rescale", "mask_rate", "drop", "layer", "backends", "seed", "model",
                                           "Masking", "p", ""]), st.one_of(st.integers(), st.none()), max_size=2)
KWARGS = st.fixed_dictionaries({}, optional={"masking": PROBABILITY, "dropping": PROBABILITY,
                                             "mask_scale": MASK_SCALE, "backend": BACKEND, "layers": LAYERS})


def _probability_ok(value, upper_inclusive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        value = float(value)
    except OverflowError:
        return False
    return 0 <= value <= 1 if upper_inclusive else 0 <= value < 1  # NaN compares False


def _selected_layers(layers):
    """The sorted layer indices ``layers`` selects, or None when it is not a valid selection."""
    if layers is None:
        return list(range(N_LAYERS))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        return None
    items = list(layers)
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < N_LAYERS for i in items):
        return None
    return sorted(set(items))


def _expected_failure(kwargs: dict, model_ok: bool):
    """(exception types, the name the message starts with, words it must hold) of the first bad argument in the
    order patch() checks them, or None when the call must succeed."""
    unknown = [k for k in kwargs if k not in ARGUMENTS]
    if unknown:
        return (TypeError,), None, unknown  # Python's own message names the keyword
    if "masking" in kwargs and not _probability_ok(kwargs["masking"], upper_inclusive=False):
        return (TypeError, ValueError), "masking", ["[0, 1)"]
    if "dropping" in kwargs and not _probability_ok(kwargs["dropping"], upper_inclusive=True):
        return (TypeError, ValueError), "dropping", ["[0, 1]"]
    if "mask_scale" in kwargs and not isinstance(kwargs["mask_scale"], bool):
        return (TypeError,), "mask_scale", ["bool"]
    backend = kwargs.get("backend", "auto")
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        return (TypeError, ValueError), "backend", [repr(n) for n in BACKEND_NAMES]
    if backend != "auto" and backend not in runnable_backends():
        return (RuntimeError,), None, [backend]  # says what to use instead, in its own words
    if not model_ok:
        return (TypeError,), "model", ["supported"]
    if _selected_layers(kwargs.get("layers")) is None:
        return (TypeError, ValueError), "layers", [f"[0, {N_LAYERS})"]
    return None


def _state(model) -> dict:
    """Everything patch() may touch, by identity where identity is the point (forwards, patch records)."""
    if not isinstance(model, nn.Module):
        return {"object": model}
    modules = dict(model.named_modules())
    return {
        "forward": {n: m.__dict__.get("forward") for n, m in modules.items()},
        "class_forward": {n: type(m).forward for n, m in modules.items()},
        "attributes": {n: sorted(m.__dict__) for n, m in modules.items()},
        "training": {n: m.training for n, m in modules.items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def _assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    if "object" in before:
        assert before["object"] is after["object"]
        return
    for key in ("forward", "class_forward"):
        assert before[key].keys() == after[key].keys()
        changed = [n for n in before[key] if before[key][n] is not after[key][n]]
        assert not changed, f"{key} changed on {changed[:3]}"
    for key in ("attributes", "training", "requires_grad"):
        assert before[key] == after[key], key
    assert before["state_dict"].keys() == after["state_dict"].keys()
    for k, v in before["state_dict"].items():
        assert torch.equal(v, after["state_dict"][k]), k


@pytest.fixture(scope="module")
def models():
    return {"peft": lora_model("llama"), "bare": tiny_model("llama"), "gpt2": tiny_model("gpt2"),
            "linear": nn.Linear(2, 2), "none": None, "string": "a model"}


GOOD_MODELS = ("peft", "bare")
PRIOR = dict(masking=0.2, dropping=0.3, layers=[1])  # an earlier, valid patch that a failed call must keep


@bounded(400)
@given(kwargs=KWARGS, unknown=UNKNOWN, which=st.sampled_from(["peft", "peft", "bare", "gpt2", "linear", "none",
                                                              "string"]),
       patched_before=st.booleans())
def test_patch_accepts_valid_arguments_and_rejects_the_rest_leaving_the_model_as_it_was(
        models, kwargs, unknown, which, patched_before):
    model = models[which]
    kwargs = {**kwargs, **unknown}
    pristine = _state(model)
    if patched_before and which in GOOD_MODELS:
        tpk.patch(model, **PRIOR)
    try:
        before = _state(model)
        expected = _expected_failure(kwargs, model_ok=which in GOOD_MODELS)
        if expected is None:
            report = tpk.patch(model, **kwargs)
            layers = _selected_layers(kwargs.get("layers"))
            assert report.patched_layers == layers
            records = patch_settings(model)
            assert sorted(records) == layers
            for record in records.values():
                assert record.settings.masking == float(kwargs.get("masking", 0.1))
                assert record.settings.dropping == float(kwargs.get("dropping", 0.1))
                assert record.settings.mask_scale is kwargs.get("mask_scale", False)
                assert record.settings.backend == kwargs.get("backend", "auto")
            return
        errors, name, words = expected
        with pytest.raises(Exception) as info:
            tpk.patch(model, **kwargs)
        message = str(info.value)
        assert isinstance(info.value, errors), f"{type(info.value).__name__}: {message}"
        assert "\n" not in message.strip(), message
        if name is not None:
            assert message.startswith(f"{name}: "), message
        assert any(w in message for w in words), f"{message!r} names none of {words}"
        _assert_same_state(before, _state(model))
    finally:
        if isinstance(model, nn.Module):
            tpk.unpatch(model)
            _assert_same_state(pristine, _state(model))  # patch + unpatch leaves nothing behind


# ---- the command line: a workspace of good inputs ---------------------------------------------------------

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Bases, data and an adapter that are all valid, under a directory whose name has spaces and non-ASCII
    characters; each example writes its bad inputs into ``ws.cases``."""
    from peft import LoraConfig, get_peft_model

    from transpeft_kernels.workflow.bases import char_tokenizer

    root = tmp_path_factory.mktemp("bad input ünïcødé ☃ dir")
    ns = type("WS", (), {})()
    ns.root = root
    for name, seed in (("old", 0), ("new", 1)):
        path = root / f"{name} base ø"
        tiny_model("llama", seed=seed).save_pretrained(path)
        char_tokenizer().save_pretrained(path)
        setattr(ns, name, path)
    ns.pc = root / "pairs é.jsonl"
    ns.pc.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(3)))
    ns.adapter = root / "adapter ☃"
    get_peft_model(tiny_model("llama", seed=0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False)).save_pretrained(ns.adapter)
    ns.adapter_config = (ns.adapter / "adapter_config.json").read_text()
    ns.adapter_weights = (ns.adapter / "adapter_model.safetensors").read_bytes()
    ns.missing = root / "nothing here ✗"
    ns.cases = root / "cases"
    ns.cases.mkdir()
    return ns


def tree(root: Path) -> dict[str, tuple]:
    """Every file (content hash, mode, mtime) and directory (mode) under ``root``. Not a directory's mtime: a
    temporary file made and removed in it (a write probe, an atomic write that failed) leaves nothing behind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            if stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = (hashlib.sha256(f.read()).hexdigest(), st_.st_mode,
                                                        st_.st_mtime_ns)
            else:
                out[os.path.relpath(path, root)] = (None, st_.st_mode)
    return out


class Case:
    """A fresh directory for one example's inputs; ``run`` calls the CLI and checks that nothing under the
    workspace changed (inputs hashed before and after, no new file or directory)."""

    def __init__(self, ws, capsys):
        self.ws, self.capsys = ws, capsys
        self.dir = Path(tempfile.mkdtemp(prefix="case ", dir=ws.cases))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def adapter(self, weights: bytes | None = None, config: bytes | str | None = None, name="adapter") -> Path:
        self.write(f"{name}/adapter_config.json", self.ws.adapter_config if config is None else config)
        self.write(f"{name}/adapter_model.safetensors", self.ws.adapter_weights if weights is None else weights)
        return self.dir / name

    def run(self, argv: list, unchanged: bool = True) -> tuple:
        before = tree(self.ws.root)
        self.capsys.readouterr()
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            rc = e.code
        captured = self.capsys.readouterr()
        if unchanged:
            after = tree(self.ws.root)
            assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))[:4]}"
        return rc, captured.err


def one_error_line(rc, err: str, *needles: str) -> str:
    """The single ``transpeft: error:`` line of a failed run, holding every needle."""
    assert "Traceback" not in err, err[-3000:]
    assert rc == 2, f"exit status {rc}: {err[-2000:]}"
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("transpeft: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def transfer_argv(ws, data, *adapters, extra=()):
    return ["transfer", "--no-progress", "--old-base", ws.old, "--new-base", ws.new, "--data", data,
            "--max-length", "16", *extra, *adapters]


# ---- JSONL data ---------------------------------------------------------------------------------------------

WRONG = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                  st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(0, 3),
                                                                            max_size=1))
STRING = st.one_of(st.text(max_size=8), st.sampled_from(["", " ", "\t\n", "a\u2028b", "x\x85y", "\u3000", "ok"]))
FIELD = st.one_of(STRING, STRING, WRONG)
RECORD = st.one_of(
    st.builds(lambda t: {"text": t}, STRING),
    st.builds(lambda p, c: {"prompt": p, "completion": c}, STRING, STRING),
    st.builds(lambda t: {"text": t}, WRONG),
    st.builds(lambda p, c: {"prompt": p, "completion": c}, FIELD, FIELD),
    st.dictionaries(st.sampled_from(["text", "prompt", "completion", "question", "Text"]), FIELD, max_size=3),
    WRONG,
)
SPECIAL_LINES = st.sampled_from([
    "[" * 100_000,  # nesting beyond the parser's recursion limit
    '{"text": ' + "9" * 5000 + "}",  # an int of more digits than Python converts
    '{"text": NaN}', '{"text": "a", "text": 5}', '{"text": "a"} {"text": "b"}', '\ufeff{"text": "a"}',
    '{"text": "\\ud800"}', '{"prompt": "a", "completion": "\\udfff"}', '{"text": "\\u0000x"}', "{", "}", "null",
])
LINE = st.one_of(
    st.tuples(RECORD, st.booleans()).map(lambda t: json.dumps(t[0], ensure_ascii=t[1])),
    st.tuples(RECORD, st.integers(0, 200)).map(lambda t: json.dumps(t[0], ensure_ascii=False)[:t[1]]),  # cut
    st.text(max_size=12),
    st.sampled_from(["", " ", "\t", "\r", " \t \r"]),
    SPECIAL_LINES,
)


@st.composite
def jsonl_bytes(draw):
    kind = draw(st.sampled_from(["lines", "lines", "lines", "not utf-8", "binary", "blank"]))
    if kind == "binary":
        return draw(st.binary(max_size=40))
    if kind == "blank":
        return draw(st.sampled_from([b"", b"\n", b"   \n\t\n", b"\r\n\r\n", b" "]))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    data = (newline.join(draw(st.lists(LINE, min_size=1, max_size=5))) + draw(st.sampled_from(["", newline]))).encode()
    if kind == "not utf-8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + data[at:]
    return data


def expected_records(raw: bytes):
    """Per the README: UTF-8 JSONL, one record per line (blank lines skipped), each {"text": ...} or
    {"prompt": ..., "completion": ...} with non-empty strings, one kind per file, at least one record.
    Returns ("ok", records), ("line", number of the first bad line) or ("file", None)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "file", None
    kind, records = None, []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return "line", number
        this = None
        if isinstance(obj, dict):
            keys = ("prompt", "completion") if ("prompt" in obj or "completion" in obj) else ("text",)
            values = [obj.get(k) for k in keys]
            if all(isinstance(v, str) and v.strip() and _is_text(v) for v in values):
                this = keys
        if this is None or (kind is not None and this != kind):
            return "line", number
        kind = this
        records.append(tuple(values))
    return ("ok", records) if records else ("file", None)


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@bounded(300)
@given(raw=jsonl_bytes())
def test_train_reads_any_jsonl_or_names_the_file_and_line(ws, capsys, raw):
    """The base is missing on purpose: data that passes is then reported as a --base problem, so nothing loads."""
    from transpeft_kernels.workflow.data import load_jsonl

    with Case(ws, capsys) as case:
        data = case.write("data ✓.jsonl", raw)
        rc, err = case.run(["train", "--no-progress", "--base", ws.missing, "--data", data, "--out", case.dir / "out"])
        verdict, detail = expected_records(raw)
        if verdict == "ok":
            one_error_line(rc, err, "--base", escaped(str(ws.missing)))
            loaded = load_jsonl(data)
            fields = ("prompt", "completion") if loaded.has_completions else ("text",)
            assert [tuple(getattr(ex, f) for f in fields) for ex in loaded.examples] == detail
        else:
            line = one_error_line(rc, err, "--data", escaped(str(data)))
            if verdict == "line":
                assert f"{escaped(str(data))}:{detail}: " in line, line


@bounded(20)
@given(raw=jsonl_bytes().filter(lambda r: expected_records(r)[0] != "ok"))
def test_transfer_rejects_bad_jsonl_before_loading_anything(ws, capsys, raw):
    with Case(ws, capsys) as case:
        data = case.write("eval.jsonl", raw)
        rc, err = case.run(transfer_argv(ws, data, ws.adapter))
        one_error_line(rc, err, "--data", escaped(str(data)))


# ---- adapters: damaged weights, damaged configs, other shapes ----------------------------------------------

@st.composite
def damaged_weights(draw, size: int, header_end: int):
    """(bytes transform, whether the result must be rejected) of a safetensors file: cut short, grown, its
    length prefix replaced, or bytes of its JSON header overwritten (which may leave it valid)."""
    how = draw(st.sampled_from(["truncate", "truncate", "append", "length", "header"]))
    if how == "truncate":
        at = draw(st.integers(0, size - 1))
        return (lambda b: b[:at]), True
    if how == "append":
        extra = draw(st.binary(min_size=1, max_size=16))
        return (lambda b: b + extra), True
    if how == "length":
        n = draw(st.one_of(st.integers(0, 2 * header_end), st.integers(0, 2**64 - 1)).filter(
            lambda v: v != header_end - 8))
        return (lambda b: struct.pack("<Q", n) + b[8:]), True
    edits = draw(st.lists(st.tuples(st.integers(8, header_end - 1), st.integers(0, 255)), min_size=1, max_size=4))

    def overwrite(b):
        b = bytearray(b)
        for at, value in edits:
            b[at] = value
        return bytes(b)
    return overwrite, False


@bounded(100)
@given(data=st.data())
def test_transfer_rejects_truncated_or_corrupted_adapter_weights(ws, capsys, data):
    weights = ws.adapter_weights
    header_end = 8 + struct.unpack("<Q", weights[:8])[0]
    transform, must_fail = data.draw(damaged_weights(len(weights), header_end))
    with Case(ws, capsys) as case:
        adapter = case.adapter(weights=transform(weights))
        rc, err = case.run(transfer_argv(ws, ws.pc, adapter))
        if must_fail or rc != 0:  # an overwritten header byte may still spell a valid file (a name, "pt")
            one_error_line(rc, err, "ADAPTER_DIR", escaped(str(adapter)))


JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.floats(allow_nan=False),
                                    st.sampled_from(["LORA", "IA3", "none", "all", "q_proj", "CAUSAL_LM", "x", ""])),
                          lambda inner: st.one_of(st.lists(inner, max_size=2),
                                                  st.dictionaries(st.sampled_from(["q_proj", "r", "x"]), inner,
                                                                  max_size=2)),
                          max_leaves=4)
CONFIG_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "peft_type", "bias", "task_type",
               "fan_in_fan_out", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
               "modules_to_save", "init_lora_weights", "exclude_modules", "layer_replication", "unknown_field"]


@st.composite
def damaged_config(draw, text: str):
    how = draw(st.sampled_from(["fields", "fields", "fields", "drop", "truncate", "text", "bytes"]))
    config = json.loads(text)
    if how == "fields":
        config.update(draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUE, min_size=1, max_size=3)))
        return json.dumps(config)
    if how == "drop":
        for key in draw(st.lists(st.sampled_from(["peft_type", "r", "target_modules", "lora_alpha"]), min_size=1)):
            config.pop(key, None)
        return json.dumps(config)
    if how == "truncate":
        return text[:draw(st.integers(0, len(text) - 1))]
    if how == "text":
        return draw(st.one_of(st.text(max_size=20), st.sampled_from(["null", "[]", "{}", "[" * 100_000,
                                                                      '{"peft_type": ' + "7" * 5000 + "}"])))
    return draw(st.binary(min_size=1, max_size=20)).replace(b"{", b"\xff")


@bounded(150)
@given(data=st.data())
def test_transfer_rejects_unusable_adapter_configs_naming_the_file(ws, capsys, data):
    config = data.draw(damaged_config(ws.adapter_config))
    with Case(ws, capsys) as case:
        adapter = case.adapter(config=config)
        rc, err = case.run(transfer_argv(ws, ws.pc, adapter))
        if rc != 0:  # a config PEFT can use with these tensors evaluates like any adapter
            one_error_line(rc, err, "ADAPTER_DIR", escaped(str(adapter)))


@bounded(24)
@given(family=st.sampled_from(["llama", "qwen2", "mistral", "gpt2"]), hidden=st.sampled_from([32, 64]),
       layers=st.sampled_from([1, 2, 3]), r=st.integers(1, 3), data=st.data())
def test_transfer_rejects_adapters_of_another_shape_or_architecture(ws, capsys, family, hidden, layers, r, data):
    from peft import LoraConfig, get_peft_model

    names = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"]
    targets = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    shape = dict(hidden_size=hidden, head_dim=hidden // 4) if family != "gpt2" else dict(n_embd=hidden)
    model = tiny_model(family, num_hidden_layers=layers, **shape) if family != "gpt2" else tiny_model(
        family, n_layer=layers, **shape)
    fits = family != "gpt2" and hidden == 32 and layers <= 2
    with Case(ws, capsys) as case:
        adapter = case.dir / f"{family} {hidden} ✓"
        get_peft_model(model, LoraConfig(r=r, target_modules=targets)).save_pretrained(adapter)
        rc, err = case.run(transfer_argv(ws, ws.pc, adapter))
        if fits:
            assert rc == 0, err[-2000:]
        else:
            one_error_line(rc, err, "ADAPTER_DIR", escaped(str(adapter)), "does not fit")


# ---- paths: unicode names, missing and half-made things ---------------------------------------------------

def test_unicode_paths_with_spaces_work_end_to_end(ws, capsys, tmp_path):
    """The good case the bad ones are measured against: every path non-ASCII and with spaces."""
    out = tmp_path / "ädapter öut ☃"
    train = ["train", "--no-progress", "--base", ws.old, "--data", ws.pc, "--out", out, "--max-steps", "1",
             "--batch-size", "2", "--r", "2", "--masking", "0.1", "--max-length", "16"]
    assert cli.main([str(a) for a in train]) == 0
    results = tmp_path / "résultats é.json"
    assert cli.main([str(a) for a in transfer_argv(ws, ws.pc, out, extra=["--json", results])]) == 0
    assert json.loads(results.read_text())["adapters"][0]["path"] == str(out)
    capsys.readouterr()



NAME = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1,
               max_size=12).filter(lambda s: s not in (".", "..") and len(s.encode()) < 200)
NAME = st.one_of(NAME, st.sampled_from(["dir with spaces", "ünïcødé ☃", "line\nbreak", " lead", "é" * 40,
                                        os.fsdecode(b"caf\xe9 latin-1")]))  # the last: not UTF-8 on disk
SITUATIONS = ["base missing", "base empty", "base config only", "base without weights", "base truncated weights",
              "data missing", "data is a directory", "out under a file", "adapter missing",
              "adapter without config", "adapter without weights", "json is a directory", "json dir missing"]


@bounded(80)
@given(name=NAME, situation=st.sampled_from(SITUATIONS), command=st.sampled_from(["train", "transfer"]))
def test_paths_with_any_name_are_reported_by_name(ws, capsys, name, situation, command):
    """Bases and data through train or transfer (there as the new base: the old one is evaluated first, and
    still nothing is written); the rest through the command that takes them."""
    with Case(ws, capsys) as case:
        target = case.dir / name
        base, data, out, adapters, extra = ws.old, ws.pc, case.dir / "out", [ws.adapter], []
        needles = [escaped(str(target))]
        if situation.startswith("base"):
            base = target
            needles.append("--base" if command == "train" else "--new-base")
            if situation != "base missing":
                target.mkdir()
            if situation in ("base config only", "base without weights", "base truncated weights"):
                shutil.copy(ws.old / "config.json", target)
            if situation in ("base without weights", "base truncated weights"):
                for f in ("tokenizer.json", "tokenizer_config.json"):
                    shutil.copy(ws.old / f, target)
            if situation == "base truncated weights":
                weights = (ws.old / "model.safetensors").read_bytes()
                (target / "model.safetensors").write_bytes(weights[:len(weights) // 3])
        elif situation.startswith("data"):
            data = target
            needles.append("--data")
            if situation == "data is a directory":
                target.mkdir()
        elif situation == "out under a file":
            command = "train"
            target.write_text("a file")
            out = target / "adapter"
            needles.append("--out")
        elif situation.startswith("adapter"):
            command, adapters = "transfer", [target]
            needles.append("ADAPTER_DIR")
            if situation != "adapter missing":
                target.mkdir()
            if situation == "adapter without weights":
                (target / "adapter_config.json").write_text(ws.adapter_config)
            if situation == "adapter without config":
                (target / "adapter_model.safetensors").write_bytes(ws.adapter_weights)
        else:
            command = "transfer"
            needles.append("--json")
            if situation == "json is a directory":
                target.mkdir()
                extra = ["--json", target]
            else:
                extra = ["--json", target / "results.json"]
        argv = (["train", "--no-progress", "--base", base, "--data", data, "--out", out] if command == "train"
                else ["transfer", "--no-progress", "--old-base", ws.old, "--new-base", base, "--data", data,
                      "--max-length", "16", *extra, *adapters])
        rc, err = case.run(argv)
        one_error_line(rc, err, *needles)


# ---- settings: numbers out of range, NaN, inf -------------------------------------------------------------

FLOAT_TEXT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.sampled_from(["nan", "inf", "-inf", "1e309", "-0.0", "0", "1", "0.5", "1e-300"]))
INT_TEXT = st.one_of(st.integers(-3, 20).map(str), st.sampled_from(["0", "-1", str(10**30), str(2**63)]))
TRAIN_FLOATS = {"--masking": "p<1", "--dropping": "p<=1", "--lora-dropout": "p<1", "--alpha": ">0",
                "--epochs": ">0", "--lr": ">0"}
TRAIN_INTS = {"--r": ">0", "--batch-size": ">0", "--grad-accum": ">0", "--max-length": ">=4", "--max-steps": ">0",
              "--checkpoint-every": ">=0"}


def _valid(rule: str, text: str) -> bool:
    value = float(text)
    if math.isnan(value):
        return False
    return {"p<1": 0 <= value < 1, "p<=1": 0 <= value <= 1, ">0": 0 < value < math.inf,
            ">=4": 4 <= value < math.inf, ">=0": 0 <= value < math.inf}[rule]


@bounded(150)
@given(floats=st.dictionaries(st.sampled_from(sorted(TRAIN_FLOATS)), FLOAT_TEXT),
       ints=st.dictionaries(st.sampled_from(sorted(TRAIN_INTS)), INT_TEXT),
       backend=st.one_of(st.none(), st.sampled_from([*BACKEND_NAMES, "tpu", "Torch", ""])))
def test_train_settings_out_of_range_are_named(ws, capsys, floats, ints, backend):
    """The base is missing on purpose: when every setting is valid, the error is the base's."""
    settings_ = {**floats, **ints}
    rules = {**TRAIN_FLOATS, **TRAIN_INTS}
    bad = [flag for flag, text in settings_.items() if not _valid(rules[flag], text)]
    argv = ["train", "--no-progress", "--base", ws.missing, "--data", ws.pc]
    argv += [f"{flag}={text}" for flag, text in settings_.items()]  # "=": argparse reads -inf as an option
    if backend is not None:
        argv.append(f"--backend={backend}")
        masking, dropping = float(settings_.get("--masking", 0)), float(settings_.get("--dropping", 0))
        needs = backend != "auto" and (masking > 0 or dropping > 0)
        if backend not in BACKEND_NAMES or (needs and backend not in runnable_backends()):
            bad.append("--backend")
    with Case(ws, capsys) as case:
        rc, err = case.run([*argv, "--out", case.dir / "out"])
        line = one_error_line(rc, err)
        named = line.removeprefix("transpeft: error: ").split(":")[0]
        assert named in (bad or ["--base"]), line


@bounded(60)
@given(gate=st.one_of(st.none(), FLOAT_TEXT), max_length=st.one_of(st.none(), INT_TEXT),
       batch=st.one_of(st.none(), INT_TEXT))
def test_transfer_settings_out_of_range_are_named(ws, capsys, gate, max_length, batch):
    bad = []
    argv = ["transfer", "--no-progress", "--old-base", ws.missing, "--new-base", ws.new, "--data", ws.pc]
    for flag, text, rule in (("--min-retention", gate, ">=0"), ("--max-length", max_length, ">=4"),
                             ("--batch-size", batch, ">0")):
        if text is not None:
            argv.append(f"{flag}={text}")
            ok = _valid(rule, text) or (flag == "--min-retention" and float(text) == math.inf)
            bad += [] if ok else [flag]
    with Case(ws, capsys) as case:
        rc, err = case.run([*argv, ws.adapter])
        line = one_error_line(rc, err)
        named = line.removeprefix("transpeft: error: ").split(":")[0]
        assert named in (bad or ["--old-base"]), line


@bounded(10)
@given(threads=st.one_of(st.integers(-3, 0), st.sampled_from([2**31, 10**30]), st.integers(1, 2)))
def test_demo_rejects_bad_threads_and_an_impossible_out(ws, capsys, threads):
    before = torch.get_num_threads()
    try:
        with Case(ws, capsys) as case:
            blocker = case.write("a file", "x")
            rc, err = case.run(["demo", "--tiny", "--no-progress", "--threads", threads, "--out", blocker / "demo"])
            one_error_line(rc, err, "--threads" if not 1 <= threads < 2**31 else "--out")
    finally:
        torch.set_num_threads(before)


def test_argparse_errors_are_exit_two_without_traceback(ws, capsys):
    for argv in (["train", "--base", ws.old, "--data", ws.pc, "--out", ws.missing, "--r", "four"],
                 ["train", "--base", ws.old, "--data", ws.pc, "--out", ws.missing, "--masking"],
                 ["transfer", "--old-base", ws.old, "--new-base", ws.new, "--data", ws.pc],
                 ["demo", "--threads", "1.5"]):
        with Case(ws, capsys) as case:
            rc, err = case.run(argv)
            assert rc == 2 and "Traceback" not in err
            assert len([line for line in err.splitlines() if "error:" in line]) == 1, err


# ---- real processes -----------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _cli_process(*args, prefix=(), timeout=300):
    """``python -m transpeft_kernels ARGS`` from this checkout, as a user runs it (no TRANSPEFT_DEBUG)."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSPEFT_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([*prefix, sys.executable, "-m", "transpeft_kernels", *map(str, args)],
                          capture_output=True, text=True, errors="backslashreplace", timeout=timeout, env=env)


def test_a_real_process_reports_a_truncated_adapter_in_one_line(ws, tmp_path):
    adapter = tmp_path / "ädäpter with spaces"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(ws.adapter_config)
    (adapter / "adapter_model.safetensors").write_bytes(ws.adapter_weights[:len(ws.adapter_weights) // 2])
    before = tree(tmp_path), tree(ws.root)
    proc = _cli_process(*transfer_argv(ws, ws.pc, adapter))
    assert (tree(tmp_path), tree(ws.root)) == before
    one_error_line(proc.returncode, proc.stderr, "ADAPTER_DIR", "adapter_model.safetensors")
    assert proc.stderr.strip().splitlines()[-1].startswith("transpeft: error: ")


def _read_only_prefix(directory: Path):
    """The command prefix under which ``directory`` (mode 0555) is really read-only: none for an ordinary user;
    for root, whose CAP_DAC_OVERRIDE ignores permission bits (so chmod alone proves nothing), setpriv with that
    capability dropped from the bounding set. None when neither makes the directory read-only here."""
    probe = [sys.executable, "-c", f"open({str(directory / 'probe')!r}, 'w')"]
    candidates = [()]
    if shutil.which("setpriv"):
        candidates.append(("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"))
    for prefix in candidates:
        try:
            blocked = subprocess.run([*prefix, *probe], capture_output=True, timeout=60).returncode != 0
        except OSError:
            continue
        if blocked:
            return prefix
        with_probe = directory / "probe"
        if with_probe.exists():
            os.chmod(directory, 0o755)
            with_probe.unlink()
            os.chmod(directory, 0o555)
    return None


def test_a_read_only_output_directory_is_reported_before_any_work(ws, tmp_path):
    read_only = tmp_path / "read-only ø"
    read_only.mkdir()
    os.chmod(read_only, 0o555)
    try:
        prefix = _read_only_prefix(read_only)
        if prefix is None:
            pytest.skip("no way to make a read-only directory here: root ignores mode 0555 and setpriv cannot "
                        "drop CAP_DAC_OVERRIDE")
        before = tree(tmp_path), tree(ws.root)
        train = _cli_process("train", "--no-progress", "--base", ws.old, "--data", ws.pc,
                             "--out", read_only / "adapter", prefix=prefix)
        one_error_line(train.returncode, train.stderr, "--out", "cannot write in", escaped(str(read_only)))
        transfer = _cli_process(*transfer_argv(ws, ws.pc, ws.adapter, extra=["--json", read_only / "r.json"]),
                                prefix=prefix)
        one_error_line(transfer.returncode, transfer.stderr, "--json", "cannot write in")
        assert (tree(tmp_path), tree(ws.root)) == before
    finally:
        os.chmod(read_only, 0o755)
