"""The demo: do adapters trained on an old base keep working on an updated base?

1. old base: SmolLM2-135M-Instruct (offline GGUF), or a small config-built model when it is missing;
2. new base: a copy of the old base after continual training of all its weights on Python's own
   documentation (``corpus.py``), saved as a safetensors checkpoint with its tokenizer;
3. task: generated arithmetic word problems (``tasks.py``), a fixed train/test split by seed;
4. adapters: ``vanilla`` (LoRA) and ``trans-peft`` (LoRA + masking + dropping) trained on the old base,
   ``retuned-on-new`` (LoRA trained on the new base: the upper bound), plus the bases without an adapter;
5. every adapter evaluated on both bases: loss, exact-match accuracy, retention = new / old accuracy;
   a table, ``results.json``, ``results.png``.
Every artefact (data, new base, adapters) is written under the output directory, so the evaluation can be
repeated with ``transpeft transfer``. Each phase's output (the new base, each adapter, each evaluation in
``cells/``) is written atomically, so one that exists is whole: a rerun with the same settings
(``demo_settings.json``) reuses them and does only what a killed run left undone; other settings start afresh.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .data import write_jsonl
from .training import AdapterConfig, LoopConfig

ADAPTERS = ("vanilla", "trans-peft", "retuned-on-new")
NO_ADAPTER = "no adapter"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of one demo run (see PRESETS)."""

    mode: str
    n_train: int
    n_test: int
    max_length: int            # task sequences (prompt + answer) fit in 48 SmolLM2 tokens
    adapter_loop: LoopConfig
    adapter: AdapterConfig     # vanilla / retuned-on-new settings; trans-peft adds masking and dropping
    masking: float
    dropping: float
    update_passages: int       # corpus passages for the base update
    update_length: int
    update_loop: LoopConfig
    eval_batch: int = 32
    eval_bases_alone: bool = True  # also evaluate each base without an adapter (two more evaluations)
    tiny: bool = False


# Trans-PEFT settings for a 135M model. The paper's 0.1 masking + 0.1 dropping (tuned on 7B models) pushes
# SmolLM2's training-mode loss from 1.8 to ~12 (PLATFORM.md). Masking 0.05 alone costs ~0.5 nats: a clear
# but survivable push off FFN-stored knowledge. Dropping is scaled further down, to 0.02 (about 0.6 of 30
# FFNs skipped per step): at 0.05 a first quick run showed training-loss spikes to 9-12 on the steps that
# skipped an FFN this small model cannot do without, and the adapter ended far less trained (README).
MASKING, DROPPING = 0.05, 0.02
_ADAPTER = AdapterConfig(r=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj"), lora_dropout=0.05)

PRESETS = {
    # 2-core CPU, fp32 (README has the measured time). Full depth; short sequences, few steps and test items.
    "quick": DemoConfig(
        mode="quick", n_train=240, n_test=120, max_length=48,
        adapter_loop=LoopConfig(lr=1e-3, max_steps=40, batch_size=6, warmup_steps=4),
        adapter=_ADAPTER, masking=MASKING, dropping=DROPPING,
        update_passages=80, update_length=64,
        update_loop=LoopConfig(lr=2.5e-4, max_steps=10, batch_size=8, warmup_steps=2, seed=1),
        eval_bases_alone=False,
    ),
    # A GPU: bf16 base, more data, more steps, a stronger base update.
    "full": DemoConfig(
        mode="full", n_train=4000, n_test=500, max_length=64,
        adapter_loop=LoopConfig(lr=5e-4, max_steps=500, batch_size=32, warmup_steps=25),
        adapter=_ADAPTER, masking=MASKING, dropping=DROPPING,
        update_passages=2000, update_length=256,
        update_loop=LoopConfig(lr=5e-5, max_steps=300, batch_size=16, warmup_steps=20, seed=1),
        eval_batch=64,
    ),
    # Tests only: a config-built 2-layer model and a character tokenizer, seconds end to end.
    "tiny": DemoConfig(
        mode="tiny", n_train=24, n_test=6, max_length=160,
        adapter_loop=LoopConfig(lr=1e-3, max_steps=2, batch_size=4),
        adapter=replace(_ADAPTER, r=4, alpha=8), masking=MASKING, dropping=DROPPING,
        update_passages=4, update_length=64,
        update_loop=LoopConfig(lr=1e-3, max_steps=2, batch_size=4, seed=1),
        eval_batch=8, tiny=True,
    ),
}


UPDATE_LOG = "update_log.json"
ADAPTER_INFO = "adapter_info.json"


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _device_and_dtype():
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def run_demo(cfg: DemoConfig, out: Path, seed: int = 0, progress: bool = True, log=print) -> dict:
    """Run the whole demo into ``out`` and return the results dict also written to ``out/results.json``."""
    from ..integration import is_patched
    from ..provenance import environment
    from .bases import demo_old_base, load_model, load_tokenizer, resolve_base
    from .chart import save_chart
    from .corpus import fingerprint, stdlib_docs
    from .tasks import arithmetic_split
    from .training import continual_training, train_adapter
    from .transfer import evaluate_adapters, format_table, retention

    from ..atomic_io import atomic_dir, atomic_write_json, recover_dir

    timings: dict[str, float] = {}
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = _device_and_dtype()
    torch.manual_seed(seed)
    # Finished cells (bases, adapters, evaluations) of an earlier run with the same settings are reused:
    # each is written atomically, so one that exists is complete. Other settings start afresh.
    settings = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "seed": seed,
                "device": str(device), "dtype": str(dtype)}
    settings_file, cells = out / "demo_settings.json", out / "cells"
    reuse = settings_file.is_file() and _read_json(settings_file) == settings
    if not reuse:
        import shutil

        for stale in (cells, out / "new_base", out / "adapters", out / "old_base"):
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write_json(settings_file, settings)
    else:
        log(f"continuing the run in {out}: finished cells are reused")

    t = time.perf_counter()
    old, tok, model_desc, gguf = demo_old_base(cfg.tiny, seed, log=log)
    old = old.to(device=device, dtype=dtype)
    old_dir = None
    if gguf is None:  # a config-built base exists only in memory: save it so `transfer` can re-run the evaluation
        old_dir = out / "old_base"
        recover_dir(old_dir)
        if not old_dir.is_dir():
            with atomic_dir(old_dir) as tmp:
                old.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
    timings["load old base"] = time.perf_counter() - t

    train, test = arithmetic_split(cfg.n_train, cfg.n_test, seed=seed)
    (out / "data").mkdir(exist_ok=True)
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "test.jsonl", test)
    log(f"task: {len(train)} train / {len(test)} test arithmetic word problems (seed {seed}), data in {out / 'data'}")

    # --- the base update ---
    t = time.perf_counter()
    corpus = stdlib_docs(cfg.update_passages)
    log(f"new base: continual training of all weights on {len(corpus)} passages of {corpus.source} "
        f"({cfg.update_loop.max_steps} steps, lr {cfg.update_loop.lr:g})")
    # Full-weight training runs in fp32 whatever the demo's dtype: bf16 weights would round away most
    # AdamW updates at these learning rates. The checkpoint is saved in the demo's dtype.
    new_dir = out / "new_base"
    recover_dir(new_dir)
    if (new_dir / UPDATE_LOG).is_file():
        update_log = _read_json(new_dir / UPDATE_LOG)
    else:
        # what was made from an earlier new base is not made from this one
        import shutil

        shutil.rmtree(out / "adapters" / "retuned-on-new", ignore_errors=True)
        for stale in cells.glob("eval_new_*.json"):
            stale.unlink()
        new = copy.deepcopy(old).float()
        log_ = continual_training(new, tok, corpus, replace(cfg.update_loop, seed=seed + cfg.update_loop.seed),
                                  cfg.update_length, desc="base update (all weights)", progress=progress)
        update_log = {"steps": log_.steps, "first_loss": log_.losses[0], "last_loss": log_.losses[-1]}
        new = new.to(dtype)
        with atomic_dir(new_dir) as tmp:
            new.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            atomic_write_json(tmp / UPDATE_LOG, update_log)
        del new
    # Reload from disk: the new base is used exactly as a released checkpoint would be.
    new_spec = resolve_base(new_dir, "new base")
    new = load_model(new_spec, dtype=dtype).to(device)
    new_tok = load_tokenizer(new_spec)
    timings["make new base"] = time.perf_counter() - t
    log(f"new base in {new_dir} (loss on the update corpus {update_log['first_loss']:.3f} -> {update_log['last_loss']:.3f})")

    # --- adapters ---
    adapter_dirs: dict[str, Path | None] = {NO_ADAPTER: None} if cfg.eval_bases_alone else {}
    adapter_info: dict[str, dict] = {}
    plans = [("vanilla", old, tok, cfg.adapter),
             ("trans-peft", old, tok, replace(cfg.adapter, masking=cfg.masking, dropping=cfg.dropping)),
             ("retuned-on-new", new, new_tok, cfg.adapter)]
    for name, base, base_tok, adapter_cfg in plans:
        t = time.perf_counter()
        path = out / "adapters" / name
        adapter_dirs[name] = path
        recover_dir(path)
        if (path / ADAPTER_INFO).is_file():
            adapter_info[name] = _read_json(path / ADAPTER_INFO)
            log(f"adapter {name}: reused from {path}")
            continue
        for key in ("old", "new"):  # evaluations of an earlier adapter of this name
            (cells / f"eval_{key}_{_slug(name)}.json").unlink(missing_ok=True)
        peft_model, train_log, report = train_adapter(base, base_tok, train, adapter_cfg,
                                                      replace(cfg.adapter_loop, seed=seed), cfg.max_length,
                                                      desc=f"adapter {name}", progress=progress)
        assert not is_patched(peft_model)
        info = {"path": str(path), "trained_on": "new" if base is new else "old",
                "masking": adapter_cfg.masking, "dropping": adapter_cfg.dropping,
                "patched": report is not None, "steps": train_log.steps,
                "first_loss": train_log.losses[0], "last_loss": train_log.losses[-1],
                "tokens_per_s": train_log.tokens_per_s, "seconds": train_log.seconds}
        with atomic_dir(path) as tmp:
            peft_model.save_pretrained(tmp)
            atomic_write_json(tmp / ADAPTER_INFO, info)
        peft_model.unload()  # the base gets its plain Linear layers back, weights untouched
        timings[f"train {name}"] = time.perf_counter() - t
        adapter_info[name] = info
        log(f"adapter {name}: train loss {train_log.losses[0]:.3f} -> {train_log.losses[-1]:.3f}, "
            f"{train_log.tokens_per_s:,.0f} tokens/s")

    # --- evaluation on both bases ---
    t = time.perf_counter()
    def evaluated(base, base_tok, label, key):
        """Each (adapter, base) evaluation is a cell of its own: reused when an earlier run finished it."""
        done = {n: _read_json(cells / f"eval_{key}_{_slug(n)}.json") for n in adapter_dirs
                if (cells / f"eval_{key}_{_slug(n)}.json").is_file()}
        todo = {n: p for n, p in adapter_dirs.items() if n not in done}
        for n, res in evaluate_adapters(base, base_tok, todo, test, cfg.max_length, cfg.eval_batch, label,
                                        progress).items():
            atomic_write_json(cells / f"eval_{key}_{_slug(n)}.json", res)
            done[n] = res
        return done

    on_old = evaluated(old, tok, "old base", "old")
    on_new = evaluated(new, new_tok, "new base", "new")
    timings["evaluate"] = time.perf_counter() - t

    rows, table, retentions = [], [], {}
    for name in adapter_dirs:
        for base_name, res in (("old", on_old[name]), ("new", on_new[name])):
            rows.append({"adapter": name, "base": base_name, "accuracy": res["accuracy"], "loss": res["loss"]})
        retentions[name] = retention(on_old[name], on_new[name])
        table.append([name, on_old[name]["accuracy"], on_new[name]["accuracy"], on_old[name]["loss"],
                      on_new[name]["loss"], retentions[name]])
    timings["total"] = time.perf_counter() - started
    log("")
    log(format_table(table, ["adapter", "acc old", "acc new", "loss old", "loss new", "retention"]))

    results = {
        "rows": rows,
        "retention": retentions,
        "mode": cfg.mode,
        "seed": seed,
        "old_base": model_desc,
        "old_base_path": str(gguf) if gguf else str(old_dir),
        "new_base": {"path": str(new_dir), "corpus": corpus.source, "corpus_fingerprint": fingerprint(corpus),
                     "passages": len(corpus), "steps": update_log["steps"], "lr": cfg.update_loop.lr,
                     "sequence_length": cfg.update_length, "first_loss": update_log["first_loss"],
                     "last_loss": update_log["last_loss"]},
        "task": {"kind": "arithmetic word problems, exact match", "n_train": len(train), "n_test": len(test),
                 "data": str(out / "data")},
        "adapters": adapter_info,
        "settings": {"lora": {"r": cfg.adapter.r, "alpha": cfg.adapter.alpha, "targets": list(cfg.adapter.targets),
                              "lora_dropout": cfg.adapter.lora_dropout},
                     "trans_peft": {"masking": cfg.masking, "dropping": cfg.dropping},
                     "adapter_training": asdict(cfg.adapter_loop), "max_length": cfg.max_length,
                     "device": str(device), "dtype": str(dtype).replace("torch.", "")},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "environment": environment(device),
    }
    atomic_write_json(out / "results.json", results, indent=2)
    try:
        save_chart(results, out / "results.png")
        chart = str(out / "results.png")
    except ImportError:
        chart = "not drawn: pip install matplotlib, then rerun the same command (finished cells are reused)"
    old_arg = str(gguf) if gguf else str(old_dir)
    log(f"\nresults: {out / 'results.json'}, chart: {chart} ({timings['total']:.0f} s in all)")
    log(f"re-evaluate with: python -m transpeft_kernels transfer --old-base {old_arg} --new-base {new_dir} "
        f"--data {out / 'data' / 'test.jsonl'} {' '.join(str(out / 'adapters' / n) for n in ADAPTERS)}")
    return results
