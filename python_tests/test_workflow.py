"""The transfer workflow end to end on tiny models: ``train``, ``transfer`` (with its retention gate), the
demo (the study's point) in its tiny configuration, and every bad input the commands promise to reject in one line."""
import json
import math

import pytest
import torch

from tiny_models import tiny_model
from transpeft_kernels import cli

pytest.importorskip("peft")

NUMBERS = [str(i) for i in range(60)]
WORDS = ["add", "and", "minus", "is", "what", "the", "sum", "of", ":", "?", "a", "note", "on", "numbers"]


def _tokenizer():
    """A word-level tokenizer over the test vocabulary; ids 0-2 are pad/bos/eos as in the tiny configs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in NUMBERS + WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= 128
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def _save_base(path, seed=0, tokenizer=True, model_type="llama", **overrides):
    tiny_model(model_type, seed=seed, **overrides).save_pretrained(path)
    if tokenizer:
        _tokenizer().save_pretrained(path)
    return path


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = (int(v) for v in torch.randint(0, 25, (2,), generator=g))
        out.append({"prompt": f"what is the sum of {a} and {b} ?", "completion": f" {a + b}"})
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Two bases of the same architecture (old, new), data files and two trained adapters."""
    root = tmp_path_factory.mktemp("workflow")
    ns = type("WS", (), {})()
    ns.root = root
    ns.old = _save_base(root / "old", seed=0)
    ns.new = _save_base(root / "new", seed=1)
    ns.pc = _write_jsonl(root / "pc.jsonl", _pairs(24))
    ns.text = _write_jsonl(root / "text.jsonl", [{"text": "a note on numbers : " + " ".join(NUMBERS[i:i + 12])}
                                                 for i in range(0, 48, 6)])
    ns.vanilla = root / "vanilla"
    ns.transpeft = root / "transpeft"
    common = ["--base", str(ns.old), "--data", str(ns.pc), "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2",
              "--r", "4", "--alpha", "8", "--no-progress"]
    assert cli.main(["train", *common, "--out", str(ns.vanilla)]) == 0
    assert cli.main(["train", *common, "--out", str(ns.transpeft), "--masking", "0.1", "--dropping", "0.1",
                     "--targets", "q_proj", "v_proj", "gate_proj", "down_proj"]) == 0
    return ns


# ---- train ------------------------------------------------------------------------------------------

def test_train_saves_a_plain_peft_adapter_and_a_log(ws):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for adapter, patched in ((ws.vanilla, False), (ws.transpeft, True)):
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
        log = json.loads((adapter / "train_log.json").read_text())
        assert log["steps"] == 3 and len(log["losses"]) == 3 and all(math.isfinite(x) for x in log["losses"])
        assert log["tokens_per_s"] > 0 and log["tokens"] > 0
        assert (log["patch_report"] is not None) == patched
        # Stock PEFT loads it on a fresh base, every saved tensor lands on the model, and B is trained.
        saved = load_file(adapter / "adapter_model.safetensors")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws.new), adapter)
        names = {n for n, _ in model.named_parameters()}
        assert all(k.replace(".weight", ".default.weight") in names for k in saved)
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())
    log = json.loads((ws.transpeft / "train_log.json").read_text())
    assert "masking=0.1, dropping=0.1" in log["patch_report"]
    assert log["settings"]["adapter"]["targets"] == ["q_proj", "v_proj", "gate_proj", "down_proj"]


def test_train_text_data_with_gradient_checkpointing_and_grad_accum(ws, capsys):
    out = ws.root / "text_adapter"
    rc = cli.main(["train", "--base", str(ws.old), "--data", str(ws.text), "--out", str(out), "--max-steps", "2",
                   "--batch-size", "2", "--grad-accum", "2", "--gradient-checkpointing", "--masking", "0.2",
                   "--max-length", "16", "--targets", "all-linear", "--no-progress"])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["settings"]["adapter"]["targets"] == "all-linear"
    assert any(m.endswith("gate_proj") for m in json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert log["steps"] == 2 and log["settings"]["sequences"] > len(ws.text.read_text().splitlines())  # windows
    assert "tokens/s" in capsys.readouterr().out


def test_train_is_reproducible_by_seed(ws):
    from safetensors.torch import load_file

    args = ["train", "--base", str(ws.old), "--data", str(ws.pc), "--max-steps", "2", "--batch-size", "4",
            "--masking", "0.2", "--dropping", "0.3", "--lr", "1e-2", "--no-progress"]
    for name in ("rep_a", "rep_b"):
        assert cli.main([*args, "--out", str(ws.root / name)]) == 0
    a = load_file(ws.root / "rep_a" / "adapter_model.safetensors")
    b = load_file(ws.root / "rep_b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- transfer ---------------------------------------------------------------------------------------

def test_transfer_reports_both_bases_and_writes_json(ws, capsys):
    out = ws.root / "transfer.json"
    rc = cli.main(["transfer", "--old-base", str(ws.old), "--new-base", str(ws.new), "--data", str(ws.pc),
                   "--json", str(out), "--no-progress", str(ws.vanilla), str(ws.transpeft)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [a["path"] for a in res["adapters"]] == [str(ws.vanilla), str(ws.transpeft)]
    for a in res["adapters"]:
        assert set(a) == {"path", "old", "new", "retention"}
        for base in ("old", "new"):
            assert set(a[base]) == {"loss", "accuracy"}
            assert math.isfinite(a[base]["loss"]) and 0.0 <= a[base]["accuracy"] <= 1.0
        if a["old"]["accuracy"] > 0:
            assert a["retention"] == pytest.approx(a["new"]["accuracy"] / a["old"]["accuracy"])
        else:
            assert a["retention"] is None
    table = capsys.readouterr().out
    assert "retention" in table and str(ws.vanilla) in table


def test_transfer_text_data_uses_the_perplexity_ratio(ws):
    out = ws.root / "transfer_text.json"
    assert cli.main(["transfer", "--old-base", str(ws.old), "--new-base", str(ws.new), "--data", str(ws.text),
                     "--json", str(out), "--no-progress", str(ws.vanilla)]) == 0
    a = json.loads(out.read_text())["adapters"][0]
    assert a["old"]["accuracy"] is None and a["new"]["accuracy"] is None
    assert a["retention"] == pytest.approx(math.exp(a["old"]["loss"] - a["new"]["loss"]))


def test_retention_gate_sets_the_exit_status(ws, capsys):
    # Same base on both sides: retention is exactly 1 (perplexity ratio of identical losses).
    same = ["transfer", "--old-base", str(ws.old), "--new-base", str(ws.old), "--data", str(ws.text), "--no-progress"]
    assert cli.main([*same, "--min-retention", "0.99", str(ws.vanilla)]) == 0
    # Against a different base, a gate above any achievable retention fails with exit status 1.
    rc = cli.main(["transfer", "--old-base", str(ws.old), "--new-base", str(ws.new), "--data", str(ws.text),
                   "--min-retention", "1e9", "--no-progress", str(ws.vanilla), str(ws.transpeft)])
    assert rc == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "retention below" in out


def test_a_gguf_file_is_accepted_as_a_base(ws, tmp_path):
    from transpeft_kernels.workflow.bases import resolve_base

    f = tmp_path / "model.gguf"
    f.write_bytes(b"")
    spec = resolve_base(f)
    assert spec.gguf_file == "model.gguf" and spec.directory == tmp_path
    assert resolve_base(tmp_path).gguf_file == "model.gguf"  # a directory holding one GGUF file


# ---- bad input: one line, exit 2, nothing started ------------------------------------------------

@pytest.fixture(scope="module")
def bad(ws):
    """Bases, adapters and data files that the commands must reject."""
    root = ws.root / "bad"
    root.mkdir()
    ns = type("Bad", (), {})()
    ns.no_tokenizer = _save_base(root / "no_tokenizer", tokenizer=False)
    ns.not_a_model = root / "empty_dir"
    ns.not_a_model.mkdir()
    ns.text_file = _write_jsonl(root / "notes.txt", ["hello"])
    ns.missing = root / "does_not_exist"
    ns.bad_json = _write_jsonl(root / "bad_json.jsonl", [{"text": "fine"}, "{not json"])
    ns.no_fields = _write_jsonl(root / "no_fields.jsonl", [{"question": "2+2", "answer": "4"}])
    ns.half_pair = _write_jsonl(root / "half_pair.jsonl", [{"prompt": "what is 2 and 2 ?"}])
    ns.mixed = _write_jsonl(root / "mixed.jsonl", [{"text": "a note"}, {"prompt": "a", "completion": " 1"}])
    ns.empty = _write_jsonl(root / "empty.jsonl", [])
    ns.not_adapter = root / "not_adapter"
    ns.not_adapter.mkdir()
    from peft import LoraConfig, get_peft_model

    # An adapter for another architecture (GPT-2 module names) and one for another hidden size.
    ns.gpt2_adapter = root / "gpt2_adapter"
    get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(ns.gpt2_adapter)
    ns.wide_adapter = root / "wide_adapter"
    get_peft_model(tiny_model("llama", hidden_size=64, head_dim=16),
                   LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(ns.wide_adapter)
    return ns


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [l for l in err.splitlines() if l.startswith("transpeft: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _train_cases(ws, bad):
    base, data = str(ws.old), str(ws.pc)
    return {
        "missing base": (["--base", str(bad.missing), "--data", data], ["--base", "does not exist"]),
        "base is not a model": (["--base", str(bad.not_a_model), "--data", data], ["--base", "not a model directory"]),
        "base is a plain file": (["--base", str(bad.text_file), "--data", data], ["--base", "not a .gguf"]),
        "base without tokenizer": (["--base", str(bad.no_tokenizer), "--data", data], ["--base", "no tokenizer"]),
        "missing data": (["--base", base, "--data", str(bad.missing)], ["--data", "does not exist"]),
        "data is a directory": (["--base", base, "--data", str(bad.not_a_model)], ["--data", "not a file"]),
        "data not JSON": (["--base", base, "--data", str(bad.bad_json)], ["--data", ":2", "not valid JSON"]),
        "data without fields": (["--base", base, "--data", str(bad.no_fields)], ["--data", "'text'", "'prompt'"]),
        "prompt without completion": (["--base", base, "--data", str(bad.half_pair)], ["--data", "'completion'"]),
        "mixed records": (["--base", base, "--data", str(bad.mixed)], ["--data", "one kind per file"]),
        "empty data": (["--base", base, "--data", str(bad.empty)], ["--data", "no records"]),
        "masking out of range": (["--base", base, "--data", data, "--masking", "1.5"], ["--masking", "1.5"]),
        "negative dropping": (["--base", base, "--data", data, "--dropping", "-0.1"], ["--dropping"]),
        "zero rank": (["--base", base, "--data", data, "--r", "0"], ["--r"]),
        "unknown target": (["--base", base, "--data", data, "--targets", "c_attn"], ["--targets", "c_attn"]),
        "unknown backend": (["--base", base, "--data", data, "--backend", "tpu"], ["--backend"]),
        "out is a file": (["--base", base, "--data", data, "--out", str(ws.pc)], ["--out", "not a directory"]),
    }


def test_train_rejects_every_bad_input_in_one_line(ws, bad, capsys, tmp_path):
    for name, (args, needles) in _train_cases(ws, bad).items():
        out = tmp_path / name.replace(" ", "_")
        argv = ["train", *args, "--no-progress"] + ([] if "--out" in args else ["--out", str(out)])
        _one_line_error(capsys, cli.main(argv), *needles)
        assert not out.exists(), f"{name}: work started before the input was checked"


def _transfer_cases(ws, bad):
    old, new, pc = str(ws.old), str(ws.new), str(ws.pc)
    good = str(ws.vanilla)
    return {
        "missing old base": (["--old-base", str(bad.missing), "--new-base", new, "--data", pc, good], ["--old-base"]),
        "missing new base": (["--old-base", old, "--new-base", str(bad.missing), "--data", pc, good],
                             ["--new-base", "does not exist"]),
        "new base without tokenizer": (["--old-base", old, "--new-base", str(bad.no_tokenizer), "--data", pc, good],
                                       ["--new-base", "no tokenizer"]),
        "missing data": (["--old-base", old, "--new-base", new, "--data", str(bad.missing), good], ["--data"]),
        "data without fields": (["--old-base", old, "--new-base", new, "--data", str(bad.no_fields), good],
                                ["--data", "needs"]),
        "missing adapter": (["--old-base", old, "--new-base", new, "--data", pc, good, str(bad.missing)],
                            ["ADAPTER_DIR", "does not exist"]),
        "not an adapter": (["--old-base", old, "--new-base", new, "--data", pc, str(bad.not_adapter)],
                           ["ADAPTER_DIR", "adapter_config.json"]),
        "adapter is a file": (["--old-base", old, "--new-base", new, "--data", pc, str(ws.pc)],
                              ["ADAPTER_DIR", "not a directory"]),
        "adapter for another architecture": (["--old-base", old, "--new-base", new, "--data", pc, str(bad.gpt2_adapter)],
                                             ["ADAPTER_DIR", "another architecture"]),
        "adapter for another hidden size": (["--old-base", old, "--new-base", new, "--data", pc, str(bad.wide_adapter)],
                                            ["ADAPTER_DIR", "another hidden size", "64"]),
        "negative gate": (["--old-base", old, "--new-base", new, "--data", pc, "--min-retention", "-1", good],
                          ["--min-retention"]),
        "json into a missing directory": (["--old-base", old, "--new-base", new, "--data", pc, "--json",
                                           str(bad.missing / "out.json"), good], ["--json"]),
    }


def test_transfer_rejects_every_bad_input_in_one_line(ws, bad, capsys, monkeypatch):
    import transpeft_kernels.workflow.bases as bases

    def no_weights(*a, **k):  # nothing may be loaded, let alone evaluated, before the checks pass
        raise AssertionError("weights loaded before the input was checked")

    monkeypatch.setattr(bases, "load_model", no_weights)
    for name, (args, needles) in _transfer_cases(ws, bad).items():
        _one_line_error(capsys, cli.main(["transfer", "--no-progress", *args]), *needles)


def test_missing_required_flag_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["transfer", "--old-base", "x", "--data", "y", "z"])
    assert e.value.code == 2 and "--new-base" in capsys.readouterr().err


# ---- demo ---------------------------------------------------------------------------------------------
# The demo is the transfer study reduced to one point (workflow/demo.py); here on the tiny study's model and
# tasks, seconds end to end. Its resume after a kill is in test_crash_safety.py; without matplotlib in test_cli.py.

ROWS = {("vanilla", "old"), ("vanilla", "new"), ("trans-peft", "old"), ("trans-peft", "new")}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["demo", "--tiny", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_demo_tiny_writes_results_the_point_and_its_chart(demo_run):
    from transpeft_kernels.workflow.demo import PRESETS

    res = json.loads((demo_run / "results.json").read_text())
    rows = res["rows"]
    assert {(r["adapter"], r["base"]) for r in rows} == ROWS
    for r in rows:
        assert set(r) == {"adapter", "base", "accuracy", "loss"}
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"])
    point = res["point"]
    cfg = PRESETS["tiny"]
    assert point["update_steps"] == max(cfg.snapshots) and point["seeds"] == 1
    assert point["items"] == next(t.n_test for t in cfg.tasks if t.name == point["task"])
    assert set(point["retention_minus_vanilla"]) == {"mean", "low", "high"}
    setting = point["trans_peft_setting"]
    assert (setting["masking"], setting["dropping"]) == (cfg.grid_masking[0], cfg.grid_dropping[0])
    assert setting["candidates"] == 1  # fixed in advance: no grid
    for lab, info in res["adapters"]["trans-peft"].items():
        assert info["patched"] and info["masking"] == setting["masking"]
    assert not any(info["patched"] for info in res["adapters"]["vanilla"].values())
    assert "retuned-on-new" not in res["adapters"] and not list(demo_run.glob("adapters/*/retuned_*"))
    assert res["answer"].count("\n") == 0 and "full study" in res["answer"] and "re-tuned upper bound" in res["answer"]
    assert (demo_run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo_run / "study.json").is_file()
    assert (demo_run / "update" / f"step_{max(cfg.snapshots)}.safetensors").is_file()
    study = json.loads((demo_run / "study.json").read_text())
    # both tasks scored at both bases; the point is the task on which vanilla kept least (the full demo's rule)
    assert {c["task"] for c in study["cells"] if c["split"] == "test"} == {"facts", "words"}
    assert {c["task"] for c in study["cells"] if c["split"] == "dev"} == {"facts", "words"}
    kept = {r["task"]: r["retention"]["mean"] for r in study["results"]
            if r["method"] == "vanilla" and r["snapshot"] == point["update_steps"]}
    assert point["task"] == min(kept, key=lambda t: kept[t] if kept[t] is not None else float("inf"))


def test_the_full_demo_reports_the_whole_studys_point_with_seeds_and_the_retuned_adapter(tmp_path):
    # the full demo is a whole study preset (cpu or gpu; here the tiny one): same report, every method, 2 seeds
    from transpeft_kernels.workflow.demo import run_demo
    from transpeft_kernels.workflow.study import PRESETS

    res = run_demo(PRESETS["tiny"], tmp_path / "full", progress=False, log=lambda *a: None)
    assert {(r["adapter"], r["base"]) for r in res["rows"]} == ROWS | {("retuned-on-new", "new")}
    point = res["point"]
    assert point["seeds"] == PRESETS["tiny"].seeds and point["update_steps"] == max(PRESETS["tiny"].snapshots)
    assert point["trans_peft_setting"]["candidates"] == len(PRESETS["tiny"].grid_masking) * len(
        PRESETS["tiny"].grid_dropping)
    assert "gap_closed" in point and "re-tuned on the updated base reaches" in res["answer"]
    assert "(this run)" in res["answer"]
    assert json.loads((tmp_path / "full" / "results.json").read_text())["rows"] == res["rows"]


def test_demo_rerun_with_another_mode_is_refused_in_one_line(demo_run, capsys):
    # the full tiny study is another configuration: its cells would not be this run's
    from transpeft_kernels.workflow.demo import config_for
    from transpeft_kernels.workflow.study import check_out
    from transpeft_kernels.errors import UserError

    with pytest.raises(UserError, match="other settings"):
        check_out(demo_run, config_for("full", False))


def _point(mean, low, high, vanilla_high=0.9, qualified=True):
    est = lambda m: {"mean": m, "low": m, "high": m}  # noqa: E731
    methods = {name: {"old": {"accuracy": est(0.6), "loss": est(1.0)}, "new": {"accuracy": est(0.5), "loss": est(1.2)},
                      "retention": {"mean": 0.8, "low": 0.7, "high": vanilla_high}}
               for name in ("vanilla", "trans-peft", "retuned-on-new")}
    return {"task": "facts", "update_steps": 200, "update": {"reference_ppl_change": 0.12}, "items": 500, "seeds": 1,
            "methods": methods, "retention_minus_vanilla": {"mean": mean, "low": low, "high": high},
            "trans_peft_setting": {"masking": 0.1, "dropping": 0.02, "qualified": qualified, "tolerance": 0.02,
                                   "dev_accuracy": 0.6, "vanilla_dev_accuracy": 0.61}}


def test_the_plain_answer_says_what_the_interval_allows():
    from transpeft_kernels.workflow.demo import plain_answer

    more = plain_answer(_point(0.05, 0.01, 0.09), "X/study.json")
    assert "Yes: Trans-PEFT kept 5.0 points more" in more and "+1.0 to +9.0" in more and "excludes 0" in more
    less = plain_answer(_point(-0.05, -0.09, -0.01), "X/study.json")
    assert "No: Trans-PEFT kept 5.0 points less" in less
    none = plain_answer(_point(0.01, -0.03, 0.05), "X/study.json")
    assert "includes 0" in none and "no detectable difference" in none and "500 test items, one seed" in none
    assert "X/study.json" in none and "The transfer study" in none
    assert "little for Trans-PEFT to keep" in plain_answer(_point(0.0, -0.02, 0.02, vanilla_high=1.01), "X")
    assert "The fixed Trans-PEFT setting was not within 2 points" in plain_answer(
        _point(0.0, -0.02, 0.02, qualified=False), "X")
    assert "cannot answer" in plain_answer(_point(None, None, None), "X")
    for text in (more, less, none):
        assert "\n" not in text


def test_the_point_is_the_largest_update_where_vanilla_kept_least():
    from transpeft_kernels.workflow.demo import most_informative

    def row(task, k, ret):
        return {"group": "g", "task": task, "snapshot": k, "method": "vanilla", "retention": {"mean": ret}}

    study = {"update": {"snapshots": [{"step": 0}, {"step": 25}, {"step": 200}]},
             "results": [row("facts", 25, 0.5), row("facts", 200, 0.9), row("words", 200, 0.7), row("words", 0, 1.0)]}
    assert most_informative(study) == ("g", "words", 200)
