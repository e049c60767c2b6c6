"""The transfer study: how much of an adapter's accuracy survives base updates of several sizes, for vanilla
LoRA and for Trans-PEFT, against an adapter re-tuned on each updated base.

1. Updates of several sizes: ONE continual-pretraining run of every weight of the old base on Python's own
   documentation (``corpus.py``), learning rate warmed up then constant (so the snapshot after k steps does
   not depend on how long the run goes on), snapshots saved after each size in ``snapshots`` (0 is the old
   base). Each snapshot is measured by (a) the perplexity of text sampled from the old base (its own
   distribution: the log of the ratio is the KL divergence from the old base, per token), (b) the
   perplexity of held-out update-corpus passages, (c) ||W_new - W_old|| / ||W_old|| per module kind.
2. Tasks (``study_tasks.py``): ``facts`` leans on stored knowledge, ``words`` is a copying pattern. The tasks
   of a group are trained as one adapter on their joined training sets and scored per task.
3. Protocol, fixed before any updated base is evaluated: every Trans-PEFT setting of the grid is trained
   (seed 0, the same steps as vanilla) on the old base and scored on the DEV split on the old base; the
   chosen setting is the strongest (largest masking, then dropping) whose mean dev accuracy over the
   group's tasks is within ``tolerance`` of vanilla's; if none is, the one with the best dev accuracy.
   Only then are more seeds trained and the TEST split scored, first on the old base, then on each snapshot.
4. Adapters: vanilla and Trans-PEFT, seeds 0..N-1, trained once on the old base and scored on every
   snapshot; one re-tuned vanilla adapter per snapshot (seed 0; at snapshot 0 it is vanilla seed 0).
5. Per (group, task, snapshot, method): accuracy and answer loss, retention (accuracy on the snapshot /
   on the old base; for the re-tuned adapter, over vanilla seed 0's old-base accuracy) and, for Trans-PEFT, the
   share of the transfer gap it closes, (tp - vanilla) / (retuned - vanilla); 95% paired bootstrap
   intervals over test items and seeds (``stats.py``).

Every finished cell (snapshot, snapshot measures, adapter, scoring) is a file written atomically under the
output directory and reused by a rerun; ``study.json`` and the chart are rebuilt from the cells at the end.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..atomic_io import atomic_dir, atomic_path, atomic_write_json, recover_dir
from ..errors import UserError
from .chart import write_png
from .data import PROMPT_COMPLETION, Dataset
from .training import IGNORE, AdapterConfig, Encoded, LoopConfig, collate, encode, token_losses

METHODS = ("vanilla", "trans-peft", "retuned")
DATA_SEED = 0      # the task splits
UPDATE_SEED = 0    # the update's data order

PROTOCOL = (
    "Trans-PEFT settings are fixed before any updated base is evaluated, from old-base DEV accuracy only: each "
    "grid setting is trained with seed 0 for the same number of steps as vanilla; the chosen setting is the "
    "strongest (largest masking, then largest dropping) whose mean dev accuracy over the group's tasks is at "
    "least vanilla's minus the tolerance; if none qualifies, the setting with the best dev accuracy. Vanilla, "
    "Trans-PEFT and re-tuned adapters train for equal numbers of steps with the same batch size and learning "
    "rate. Test items are scored only after the choice is written (selection_*.json).")


@dataclass(frozen=True)
class TaskSize:
    name: str
    n_train: int
    n_dev: int
    n_test: int


@dataclass(frozen=True)
class StudyConfig:
    """Sizes and settings of one study (see PRESETS)."""

    preset: str
    tasks: tuple[TaskSize, ...]
    groups: tuple[tuple[str, ...], ...]  # tasks trained together as one adapter
    max_length: int
    adapter: AdapterConfig               # vanilla and re-tuned; Trans-PEFT adds masking and dropping
    adapter_loop: LoopConfig             # its seed is replaced by the study's seeds
    grid_masking: tuple[float, ...]
    grid_dropping: tuple[float, ...]
    snapshots: tuple[int, ...]           # update steps; 0 is the old base
    update_lr: float
    update_warmup: int
    update_batch: int
    update_length: int
    update_passages: int
    heldout_passages: int
    reference_texts: int                 # samples from the old base, for the drift perplexity
    reference_tokens: int
    seeds: int = 3
    tolerance: float = 0.02
    eval_batch: int = 32
    bootstrap_draws: int = 2000
    tiny: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Tasks scored on the TEST split; () is every task. Training and dev (the selection) always use every
    # task of the group, so a preset that scores fewer tasks trains the same adapters (the demo's point).
    scored_tasks: tuple[str, ...] = ()
    measure_heldout: bool = True  # each snapshot's held-out docs perplexity (about a minute of CPU per snapshot)
    retune: bool = True           # a re-tuned adapter per updated snapshot (the upper bound; the gap closed)

    def methods(self) -> tuple[str, ...]:
        return METHODS if self.retune else tuple(m for m in METHODS if m != "retuned")

    def scored(self, group: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(t for t in group if not self.scored_tasks or t in self.scored_tasks)


_ADAPTER = AdapterConfig(r=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj"), lora_dropout=0.05)

PRESETS = {
    # 2-core CPU, fp32: 56 min measured at 2 threads on 2026-12-04 (55 cells: update 12 min, 13 adapter
    # runs 20 min, scoring 22 min, the rest 1 min; the machine also ran other jobs part of the time).
    "cpu": StudyConfig(
        preset="cpu",
        tasks=(TaskSize("facts", 400, 150, 500), TaskSize("words", 400, 150, 500)),
        groups=(("facts", "words"),),
        max_length=48,
        adapter=_ADAPTER,
        adapter_loop=LoopConfig(lr=1e-3, max_steps=60, batch_size=8, warmup_steps=4),
        grid_masking=(0.02, 0.05, 0.1), grid_dropping=(0.0, 0.02),
        snapshots=(0, 25, 75, 200), update_lr=1e-4, update_warmup=10, update_batch=4, update_length=64,
        update_passages=400, heldout_passages=40, reference_texts=16, reference_tokens=48,
        seeds=3, eval_batch=32,
        notes=("one re-tuned adapter (seed 0) per snapshot: the upper bound has no seed interval",
               "facts and words are trained as one adapter (half the training time) and scored separately"),
    ),
    # One H200, bf16 adapters (the update trains in fp32). NOT RUN YET; estimated 6-7 minutes: GGUF load ~30 s,
    # 1000 fp32 update steps of 16 x 128 tokens ~70 s, 19 adapter runs of 150 steps at ~45-100 ms (launch-bound
    # at this size) ~200 s, scoring ~20 s. The masks use the torch backend: the Triton kernels have not run on a
    # GPU yet, and the study measures the method, which gives the same masks on every backend.
    "gpu": StudyConfig(
        preset="gpu",
        tasks=(TaskSize("facts", 400, 150, 500), TaskSize("words", 2000, 300, 1000)),
        groups=(("facts", "words"),),
        max_length=48,
        adapter=replace(_ADAPTER, backend="torch"),
        adapter_loop=LoopConfig(lr=5e-4, max_steps=150, batch_size=32, warmup_steps=10),
        grid_masking=(0.02, 0.05, 0.1), grid_dropping=(0.0, 0.02),
        snapshots=(0, 50, 150, 400, 1000), update_lr=1e-4, update_warmup=20, update_batch=16,
        update_length=128, update_passages=2000, heldout_passages=100, reference_texts=32,
        reference_tokens=64, seeds=5, eval_batch=128,
        notes=("untested: sized from CPU measurements and the model's size, not run on a GPU yet",
               "one re-tuned adapter (seed 0) per snapshot"),
    ),
    # Tests only: a config-built 2-layer model and a character tokenizer; seconds end to end.
    "tiny": StudyConfig(
        preset="tiny",
        tasks=(TaskSize("facts", 12, 6, 8), TaskSize("words", 12, 6, 8)),
        groups=(("facts", "words"),),
        max_length=96,
        adapter=replace(_ADAPTER, r=4, alpha=8),
        adapter_loop=LoopConfig(lr=1e-3, max_steps=2, batch_size=4),
        grid_masking=(0.05, 0.1), grid_dropping=(0.0,),
        snapshots=(0, 1, 2, 4), update_lr=1e-3, update_warmup=1, update_batch=2, update_length=32,
        update_passages=6, heldout_passages=2, reference_texts=2, reference_tokens=8,
        seeds=2, eval_batch=8, bootstrap_draws=200, tiny=True,
    ),
}


# ---- the selection rule -----------------------------------------------------------------------------

def select_setting(vanilla_dev: float, candidates: list[tuple[float, float, float]],
                   tolerance: float = 0.02) -> tuple[float, float, bool]:
    """(masking, dropping, qualified) from (masking, dropping, dev accuracy) candidates: the strongest setting
    (largest masking, then dropping) whose dev accuracy is at least ``vanilla_dev - tolerance``; when none
    is, the best dev accuracy (the weaker setting on ties), with qualified False."""
    if not candidates:
        raise ValueError("no candidate settings")
    ok = [c for c in candidates if c[2] >= vanilla_dev - tolerance - 1e-12]
    if ok:
        m, d, _ = max(ok, key=lambda c: (c[0], c[1]))
        return m, d, True
    m, d, _ = max(candidates, key=lambda c: (c[2], -c[0], -c[1]))
    return m, d, False


# ---- labels and paths --------------------------------------------------------------------------------

def group_name(group: tuple[str, ...]) -> str:
    return "+".join(group)


def adapter_label(masking: float, dropping: float, seed: int) -> str:
    return f"vanilla_s{seed}" if masking == 0 and dropping == 0 else f"tp_m{masking:g}_d{dropping:g}_s{seed}"


def retuned_label(step: int) -> str:
    return f"retuned_k{step}_s0"


@dataclass
class _Layout:
    out: Path

    def snapshot(self, k: int) -> Path:
        return self.out / "update" / f"step_{k}.safetensors"

    def measures(self, k: int) -> Path:
        return self.out / "update" / f"step_{k}.json"

    @property
    def update_state(self) -> Path:
        return self.out / "update" / "state.pt"

    @property
    def reference(self) -> Path:
        return self.out / "update" / "reference.json"

    def adapter(self, group: str, label: str) -> Path:
        return self.out / "adapters" / group / label

    def score(self, group: str, split: str, k: int, label: str) -> Path:
        return self.out / "scores" / group / f"{split}_k{k}" / f"{label}.json"

    def selection(self, group: str) -> Path:
        return self.out / f"selection_{group}.json"


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _device_and_dtype():
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


class _Cells:
    """Counts the study's cells and prints one line per cell (done now, or reused)."""

    def __init__(self, total: int, log):
        self.total, self.done, self.log = total, 0, log
        self.reused = self.computed = 0

    def start(self, what: str, reused: bool) -> None:
        self.done += 1
        if reused:
            self.reused += 1
        else:
            self.computed += 1
            self.log(f"[{self.done}/{self.total}] {what}")


# ---- the update and its measures ---------------------------------------------------------------------

def _corpus(cfg: StudyConfig):
    from .corpus import stdlib_docs
    from .data import from_texts

    docs = stdlib_docs(cfg.update_passages + cfg.heldout_passages)
    texts = [ex.text for ex in docs.examples]
    if len(texts) < 2:
        raise UserError("the update corpus (Python's docstrings) is empty on this Python")
    held = max(1, min(cfg.heldout_passages, len(texts) // 5))
    return (from_texts(texts[:-held], docs.source + " (update)"),
            from_texts(texts[-held:], docs.source + " (held out)"), docs)


def _save_weights(model, path: Path) -> None:
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, str(tmp))  # handles tied embeddings, which save_file refuses


def _load_weights(model, path: Path) -> None:
    from safetensors.torch import load_model

    load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))


def run_update(old, tok, cfg: StudyConfig, layout: _Layout, device, cells: _Cells, progress: bool, log) -> dict:
    """The continual-pretraining run: writes each snapshot (k > 0) once; resumes from the last snapshot with
    its optimizer state (``update/state.pt``, deleted when the run ends)."""
    from tqdm.auto import tqdm

    train, _, _ = _corpus(cfg)
    steps = sorted(k for k in cfg.snapshots if k > 0)
    missing = [k for k in steps if not layout.snapshot(k).is_file()]
    for k in steps:
        if k not in missing:
            cells.start(f"update snapshot {k} steps", reused=True)
    if not missing:
        return {"reused": True}
    items = encode(train, tok, cfg.update_length)
    model = copy.deepcopy(old).to(device=device, dtype=torch.float32)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.update_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(UPDATE_SEED)
    order: list[int] = []
    start, losses = 0, []
    state = torch.load(layout.update_state, weights_only=True) if layout.update_state.is_file() else None
    if state is not None and layout.snapshot(state["step"]).is_file() and state["step"] < missing[0] + 1:
        start = state["step"]
        _load_weights(model, layout.snapshot(start))
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        order, losses = list(state["order"]), list(state["losses"])
        log(f"update: resuming after step {start}")
    last = steps[-1]
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, last), desc="base update (all weights)", disable=not progress, dynamic_ncols=True,
               initial=start, total=last)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.update_lr * min(1.0, (step + 1) / max(cfg.update_warmup, 1))
        if len(order) < cfg.update_batch:
            order += torch.randperm(len(items), generator=gen).tolist()
        take, order = order[:cfg.update_batch], order[cfg.update_batch:]
        loss, n = token_losses(model, collate([items[i] for i in take], tok.pad_token_id))
        (loss / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) / max(n, 1))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step + 1 in steps:
            if not layout.snapshot(step + 1).is_file():  # a kill may fall between a snapshot and the state
                _save_weights(model, layout.snapshot(step + 1))
                cells.start(f"update snapshot {step + 1} steps (written)", reused=False)
            if step + 1 < last:
                with atomic_path(layout.update_state) as tmp:
                    torch.save({"step": step + 1, "optimizer": opt.state_dict(), "generator": gen.get_state(),
                                "order": order, "losses": losses}, tmp)
    layout.update_state.unlink(missing_ok=True)
    atomic_write_json(layout.out / "update" / "update_log.json",
                      {"losses": losses, "seconds_this_run": time.perf_counter() - t0, "sequences": len(items)})
    del model, opt
    return {"reused": False}


_KINDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
          "down_proj": "down", "embed_tokens": "embedding"}


def _kind(name: str) -> str:
    for part, kind in _KINDS.items():
        if f".{part}." in f".{name}":
            return kind
    return "norm" if "norm" in name else "other"


@torch.no_grad()
def weight_change(old_state: dict, new_state: dict) -> dict[str, float]:
    """||W_new - W_old|| / ||W_old|| (Frobenius, over all modules of a kind) per module kind, and for
    ``attention`` (q, k, v, o) and ``ffn`` (gate, up, down) together."""
    diff: dict[str, float] = {}
    base: dict[str, float] = {}
    seen: set[int] = set()
    for name, w in old_state.items():
        if w.data_ptr() in seen:
            continue  # a tied weight (the LM head sharing the embedding) counts once
        seen.add(w.data_ptr())
        kind = _kind(name)
        w = w.float()
        diff[kind] = diff.get(kind, 0.0) + float((new_state[name].float().to(w.device) - w).pow(2).sum())
        base[kind] = base.get(kind, 0.0) + float(w.pow(2).sum())
    for agg, kinds in (("attention", ("q", "k", "v", "o")), ("ffn", ("gate", "up", "down"))):
        if all(k in base for k in kinds):
            diff[agg] = sum(diff[k] for k in kinds)
            base[agg] = sum(base[k] for k in kinds)
    return {k: (diff[k] / base[k]) ** 0.5 if base[k] > 0 else 0.0 for k in diff}


REFERENCE_PROMPTS = (
    "The history of the Roman Empire", "How do plants make their food?", "A recipe for a simple tomato soup",
    "The rules of football are", "Why is the sky blue?", "My favourite holiday was", "The first step in learning "
    "to paint is", "Mountains are formed when", "A good night's sleep", "The capital cities of Europe",
    "Here is a short story about a lost dog.", "Exercise is important because", "The invention of the printing "
    "press", "To write a polite email,", "The ocean covers most of", "Music can change your mood",
)


@torch.no_grad()
def reference_samples(old, tok, cfg: StudyConfig, device) -> dict:
    """Continuations sampled from the old base at temperature 1 (token ids, kept so that every snapshot
    scores exactly the same tokens)."""
    torch.manual_seed(UPDATE_SEED)
    prompts = [REFERENCE_PROMPTS[i % len(REFERENCE_PROMPTS)] for i in range(cfg.reference_texts)]
    eos = tok.eos_token_id
    out = []
    model = old.to(device)
    for prompt in prompts:  # one at a time: no padding to get wrong, and a few seconds in all
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        prompt = torch.tensor([ids], device=device)
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=cfg.reference_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos)
        sample = gen[0, len(ids):].tolist()
        if eos in sample:
            sample = sample[:sample.index(eos)]
        if sample:
            out.append({"prompt": ids, "sample": sample})
    return {"texts": out, "temperature": 1.0, "tokens": sum(len(t["sample"]) for t in out)}


@torch.no_grad()
def reference_loss(model, ref: dict, pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy (nats per token) of the sampled continuations given their prompts."""
    items = [Encoded(t["prompt"] + t["sample"], [IGNORE] * len(t["prompt"]) + t["sample"]) for t in ref["texts"]]
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(items), batch_size):
        loss, n = token_losses(model, collate(items[start:start + batch_size], pad_id))
        total += float(loss)
        count += n
    return total / max(count, 1)


def measure_snapshots(old, tok, cfg: StudyConfig, layout: _Layout, device, cells: _Cells, progress: bool,
                      log) -> list[dict]:
    """One measures file per snapshot: drift perplexity, held-out perplexity, relative weight change."""
    import math

    from .evaluation import mean_loss

    _, heldout, _ = _corpus(cfg)
    if layout.reference.is_file():
        ref = _read_json(layout.reference)
    else:
        ref = reference_samples(old, tok, cfg, device)
        atomic_write_json(layout.reference, ref)
    old_state = None
    results = []
    for k in cfg.snapshots:
        path = layout.measures(k)
        done = path.is_file()
        cells.start(f"measure snapshot {k}", reused=done)
        if done:
            results.append(_read_json(path))
            continue
        if old_state is None:
            old_state = {n: t.detach() for n, t in old.state_dict().items()}
        model = old if k == 0 else copy.deepcopy(old)
        if k:
            _load_weights(model, layout.snapshot(k))
        ref_loss = reference_loss(model, ref, tok.pad_token_id, cfg.eval_batch)
        held_loss = mean_loss(model, tok, heldout, cfg.update_length, cfg.eval_batch, desc=f"held-out k={k}",
                              progress=progress) if cfg.measure_heldout else None
        changes = weight_change(old_state, model.state_dict()) if k else {}
        res = {"step": k, "reference_loss": ref_loss, "reference_ppl": math.exp(ref_loss),
               "heldout_loss": held_loss, "heldout_ppl": None if held_loss is None else math.exp(held_loss),
               "weight_change": changes}
        atomic_write_json(path, res)
        results.append(res)
        if k:
            del model
    base = results[0]
    for r in results:
        r["reference_ppl_change"] = r["reference_ppl"] / base["reference_ppl"] - 1
        r["heldout_ppl_change"] = (None if r["heldout_ppl"] is None or base["heldout_ppl"] is None
                                   else r["heldout_ppl"] / base["heldout_ppl"] - 1)
    return results


# ---- adapters and scoring ----------------------------------------------------------------------------

def _train_cell(base, tok, data: Dataset, adapter: AdapterConfig, loop: LoopConfig, cfg: StudyConfig, path: Path,
                cells: _Cells, what: str, progress: bool) -> dict:
    from .training import train_adapter

    recover_dir(path)
    info_file = path / "info.json"
    done = info_file.is_file()
    cells.start(f"train {what}", reused=done)
    if done:
        return _read_json(info_file)
    peft_model, log_, report = train_adapter(base, tok, data, adapter, loop, cfg.max_length, desc=what,
                                             progress=progress)
    info = {"masking": adapter.masking, "dropping": adapter.dropping, "seed": loop.seed, "steps": log_.steps,
            "first_loss": log_.losses[0], "last_loss": log_.losses[-1], "seconds": log_.seconds,
            "tokens_per_s": log_.tokens_per_s, "patched": report is not None}
    with atomic_dir(path) as tmp:
        peft_model.save_pretrained(tmp)
        atomic_write_json(tmp / "info.json", info)
    peft_model.unload()  # the base gets its plain layers back, weights untouched
    return info


def _score_cell(base, tok, adapter_dir: Path, datasets: dict[str, Dataset], cfg: StudyConfig, path: Path,
                cells: _Cells, what: str, progress: bool) -> dict:
    from peft import PeftModel

    from .study_eval import score_items

    done = path.is_file()
    cells.start(f"score {what}", reused=done)
    if done:
        return _read_json(path)
    t = time.perf_counter()
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    try:
        res = {task: score_items(model, tok, ds, cfg.max_length, cfg.eval_batch, desc=f"{what} {task}",
                                 progress=progress) for task, ds in datasets.items()}
    finally:
        model.unload()
    res["seconds"] = time.perf_counter() - t
    atomic_write_json(path, res, indent=None)
    return res


def _accuracy(scores: dict, tasks) -> float:
    return sum(sum(scores[t]["correct"]) / len(scores[t]["correct"]) for t in tasks) / len(tasks)


def count_cells(cfg: StudyConfig, seeds: int) -> int:
    grid = len(cfg.grid_masking) * len(cfg.grid_dropping)
    later = len(cfg.snapshots) - 1
    per_group = ((1 + grid) * 2              # grid training + dev scoring (vanilla included)
                 + 2 * (seeds - 1)           # more seeds of vanilla and Trans-PEFT
                 + 2 * seeds                 # test scores on the old base
                 + later * (2 * cfg.retune + 2 * seeds))  # per snapshot: re-tune, score everything
    return later + len(cfg.snapshots) + len(cfg.groups) * per_group


# ---- the whole study ---------------------------------------------------------------------------------

def settings_of(cfg: StudyConfig, device, dtype) -> dict:
    """What a rerun must match to reuse the cells (the number of seeds may grow: seed k's cells stay valid)."""
    config = asdict(cfg)
    for name, default in _ADDED_FIELDS.items():
        if config[name] == default:
            del config[name]
    return {"config": json.loads(json.dumps(config, default=str)), "device": device.type,
            "dtype": str(dtype).replace("torch.", ""), "data_seed": DATA_SEED, "update_seed": UPDATE_SEED}


# Fields added after the first studies were run, left out of the settings at their defaults, so that a study
# begun before them (whose settings file lacks them) is still continued from its cells.
_ADDED_FIELDS = {"scored_tasks": (), "measure_heldout": True, "retune": True}


def check_out(out: Path, cfg: StudyConfig) -> None:
    """UserError when ``out`` holds a study made with other settings (its cells would not be comparable)."""
    device, dtype = _device_and_dtype()
    existing = out / "study_settings.json"
    if existing.is_file():
        old = _read_json(existing)
        if old is not None and old != settings_of(cfg, device, dtype):
            what = old.get("config", {}).get("preset", "?") if isinstance(old, dict) else "?"
            raise UserError(f"--out: {out} holds a study with other settings (preset {what!r}, "
                            f"{old.get('device') if isinstance(old, dict) else '?'}); give another --out or "
                            f"delete it")


def run_study(cfg: StudyConfig, out: Path, seeds: int | None = None, progress: bool = True, log=print,
              chart: bool = True) -> dict:
    """Run (or continue) the study in ``out``; returns the dict written to ``out/study.json``. ``chart``:
    draw ``study.png`` (without matplotlib: everything else is written and one line says how to get it)."""
    import numpy as np

    from ..provenance import environment
    from .bases import demo_old_base
    from .data import write_jsonl
    from .study_tasks import make_task

    seeds = cfg.seeds if seeds is None else seeds
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    layout = _Layout(out)
    device, dtype = _device_and_dtype()
    check_out(out, cfg)
    atomic_write_json(out / "study_settings.json", settings_of(cfg, device, dtype))
    for stale in [*out.glob(".*.tmp"), *out.glob("update/.*.tmp"), *out.glob("scores/*/*/.*.tmp")]:
        stale.unlink(missing_ok=True)  # what a killed atomic write left (never a finished cell)
    cells = _Cells(count_cells(cfg, seeds), log)

    t = time.perf_counter()
    old, tok, model_desc, gguf = demo_old_base(cfg.tiny, DATA_SEED, log=log)
    old = old.float()
    timings["load old base"] = time.perf_counter() - t

    tasks = {ts.name: make_task(ts.name, ts.n_train, ts.n_dev, ts.n_test, seed=DATA_SEED) for ts in cfg.tasks}
    for task in tasks.values():
        for split in ("train", "dev", "test"):
            write_jsonl(out / "data" / f"{task.name}_{split}.jsonl", getattr(task, split))
    log("tasks: " + "; ".join(f"{n} {t.sizes()}" for n, t in tasks.items()))

    t = time.perf_counter()
    run_update(old, tok, cfg, layout, device, cells, progress, log)
    timings["update"] = time.perf_counter() - t
    t = time.perf_counter()
    measures = measure_snapshots(old.to(device), tok, cfg, layout, device, cells, progress, log)
    timings["measure snapshots"] = time.perf_counter() - t
    for m in measures:
        wc = m["weight_change"]
        change = f", weight change attention {wc['attention']:.4f} ffn {wc['ffn']:.4f}" if "attention" in wc else ""
        log(f"snapshot {m['step']:>5} steps: old-base sample ppl {m['reference_ppl']:.2f} "
            f"({m['reference_ppl_change']:+.1%})" + (f", held-out docs ppl {m['heldout_ppl']:.2f} "
                                                       f"({m['heldout_ppl_change']:+.1%})"
                                                       if m.get("heldout_ppl_change") is not None else "") + change)

    old = old.to(device=device, dtype=dtype)
    grid = [(m, d) for m in cfg.grid_masking for d in cfg.grid_dropping if m > 0 or d > 0]
    selections: dict[str, dict] = {}
    t_train, t_score = 0.0, 0.0
    group_data = {}
    for group in cfg.groups:
        g = group_name(group)
        train = Dataset(PROMPT_COMPLETION, tuple(ex for name in group for ex in tasks[name].train.examples),
                        f"{g} train")
        dev = {name: tasks[name].dev for name in group}
        group_data[g] = (train, dev, {name: tasks[name].test for name in cfg.scored(group)})
        # 1. the grid on the old base, scored on dev: the choice is made here, before any updated base
        dev_acc = {}
        for m, d in [(0.0, 0.0)] + grid:
            label = adapter_label(m, d, 0)
            t = time.perf_counter()
            _train_cell(old, tok, train, replace(cfg.adapter, masking=m, dropping=d),
                        replace(cfg.adapter_loop, seed=0), cfg, layout.adapter(g, label), cells, f"{g} {label}",
                        progress)
            t_train += time.perf_counter() - t
            t = time.perf_counter()
            scores = _score_cell(old, tok, layout.adapter(g, label), dev, cfg, layout.score(g, "dev", 0, label),
                                 cells, f"{g} {label} on old base (dev)", progress)
            t_score += time.perf_counter() - t
            dev_acc[(m, d)] = {name: sum(scores[name]["correct"]) / len(scores[name]["correct"]) for name in group}
        mean_dev = {k: sum(v.values()) / len(v) for k, v in dev_acc.items()}
        masking, dropping, qualified = select_setting(mean_dev[(0.0, 0.0)], [(m, d, mean_dev[(m, d)]) for m, d in grid],
                                                      cfg.tolerance)
        selection = {"group": g, "rule": PROTOCOL, "tolerance": cfg.tolerance,
                     "vanilla_dev_accuracy": mean_dev[(0.0, 0.0)], "vanilla_dev_per_task": dev_acc[(0.0, 0.0)],
                     "candidates": [{"masking": m, "dropping": d, "dev_accuracy": mean_dev[(m, d)],
                                     "dev_per_task": dev_acc[(m, d)]} for m, d in grid],
                     "chosen": {"masking": masking, "dropping": dropping}, "qualified": qualified}
        prior = _read_json(layout.selection(g))
        if prior is None or prior.get("chosen") != selection["chosen"]:
            atomic_write_json(layout.selection(g), selection)
        selections[g] = selection
        log(f"{g}: vanilla dev accuracy {mean_dev[(0.0, 0.0)]:.3f}; chosen Trans-PEFT setting masking {masking:g}, "
            f"dropping {dropping:g} (dev {mean_dev[(masking, dropping)]:.3f}"
            f"{'' if qualified else ', no setting within the tolerance: best dev accuracy'})")

    # 2. more seeds on the old base, and every adapter scored on the old base's test split
    for group in cfg.groups:
        g = group_name(group)
        train, _, test = group_data[g]
        chosen = selections[g]["chosen"]
        for seed in range(seeds):
            for m, d in ((0.0, 0.0), (chosen["masking"], chosen["dropping"])):
                label = adapter_label(m, d, seed)
                t = time.perf_counter()
                if seed > 0:
                    _train_cell(old, tok, train, replace(cfg.adapter, masking=m, dropping=d),
                                replace(cfg.adapter_loop, seed=seed), cfg, layout.adapter(g, label), cells,
                                f"{g} {label}", progress)
                t_train += time.perf_counter() - t
                t = time.perf_counter()
                _score_cell(old, tok, layout.adapter(g, label), test, cfg, layout.score(g, "test", 0, label), cells,
                            f"{g} {label} on old base", progress)
                t_score += time.perf_counter() - t

    # 3. each updated base: re-tune, then score every adapter
    for k in cfg.snapshots:
        if k == 0:
            continue
        base = None
        for group in cfg.groups:
            g = group_name(group)
            train, _, test = group_data[g]
            chosen = selections[g]["chosen"]
            labels = [adapter_label(0.0, 0.0, s) for s in range(seeds)] + \
                     [adapter_label(chosen["masking"], chosen["dropping"], s) for s in range(seeds)]
            retuned = [retuned_label(k)] if cfg.retune else []
            todo = [lab for lab in labels + retuned if not layout.score(g, "test", k, lab).is_file()]
            if todo and base is None:
                base = copy.deepcopy(old)
                _load_weights(base, layout.snapshot(k))
            t = time.perf_counter()
            if retuned_label(k) in todo:
                _train_cell(base, tok, train, cfg.adapter, replace(cfg.adapter_loop, seed=0), cfg,
                            layout.adapter(g, retuned_label(k)), cells, f"{g} {retuned_label(k)}", progress)
            elif retuned:
                cells.start("", reused=True)
            t_train += time.perf_counter() - t
            t = time.perf_counter()
            for lab in labels + retuned:
                if lab in todo:
                    _score_cell(base, tok, layout.adapter(g, lab), test, cfg, layout.score(g, "test", k, lab), cells,
                                f"{g} {lab} on snapshot {k}", progress)
                else:
                    cells.start("", reused=True)
            t_score += time.perf_counter() - t
        del base
    timings["train adapters"] = t_train
    timings["score"] = t_score

    results = summarize(cfg, layout, seeds, selections, measures)
    timings["total"] = time.perf_counter() - started
    study = {
        "preset": cfg.preset,
        "question": "does an adapter trained on the old base keep its accuracy on updated bases, and does Trans-PEFT "
                    "keep more of it than vanilla LoRA?",
        "protocol": PROTOCOL,
        "old_base": model_desc,
        "old_base_path": str(gguf) if gguf else None,
        "update": {"corpus": "Python standard-library docstrings (corpus.py)", "lr": cfg.update_lr,
                   "warmup_steps": cfg.update_warmup, "schedule": "linear warm-up, then constant",
                   "batch_size": cfg.update_batch, "sequence_length": cfg.update_length,
                   "snapshots": measures, "log": _read_json(out / "update" / "update_log.json")},
        "tasks": {n: {"description": t.description, **t.sizes()} for n, t in tasks.items()},
        "groups": [list(g) for g in cfg.groups],
        "seeds": seeds,
        "selection": selections,
        "settings": {"config": json.loads(json.dumps(asdict(cfg), default=str)), "device": device.type,
                     "dtype": str(dtype).replace("torch.", ""), "data_seed": DATA_SEED, "update_seed": UPDATE_SEED,
                     "scoring": "teacher-forced greedy exact match (argmax equals every gold answer token and EOS) "
                                "and answer loss, one forward per item (study_eval.py)",
                     "intervals": f"95% paired bootstrap over test items and seeds, {cfg.bootstrap_draws} draws"},
        "notes": list(cfg.notes),
        "results": results["summary"],
        "cells": results["cells"],
        "adapters": results["adapters"],
        "cells_reused": cells.reused,
        "cells_computed": cells.computed,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "environment": {**environment(device), "numpy": np.__version__},
    }
    atomic_write_json(out / "study.json", study, indent=1)
    log("")
    log(format_results(study))
    chart_path = out / "study.png"
    if not chart:
        log(f"\nstudy: {out / 'study.json'} ({timings['total']:.0f} s in all, {cells.computed} cells computed, "
            f"{cells.reused} reused)")
        return study
    try:
        draw_chart(study, chart_path)
        log(f"\nstudy: {out / 'study.json'}, chart: {chart_path} ({timings['total']:.0f} s in all, "
            f"{cells.computed} cells computed, {cells.reused} reused)")
    except ImportError:
        log(f"\nstudy: {out / 'study.json'} ({timings['total']:.0f} s in all); no chart: pip install matplotlib, then "
            f"python -m transpeft_kernels study --chart-from {out / 'study.json'}")
    return study


def summarize(cfg: StudyConfig, layout: _Layout, seeds: int, selections: dict, measures: list[dict]) -> dict:
    """Every cell's accuracy and loss, and per (group, task, snapshot, method) the bootstrap estimates."""
    import numpy as np

    from .stats import bootstrap, gap_closed_ci, mean_ci, ratio_ci, retention_difference_ci

    draws = cfg.bootstrap_draws
    cells, summary, adapters = [], [], {}
    for group in cfg.groups:
        g = group_name(group)
        chosen = selections[g]["chosen"]
        for label_dir in sorted((layout.out / "adapters" / g).glob("*")):
            info = _read_json(label_dir / "info.json")
            if info is not None:
                adapters[f"{g}/{label_dir.name}"] = info

        def labels(method: str, k: int) -> list[str]:
            if method == "vanilla":
                return [adapter_label(0.0, 0.0, s) for s in range(seeds)]
            if method == "trans-peft":
                return [adapter_label(chosen["masking"], chosen["dropping"], s) for s in range(seeds)]
            return [adapter_label(0.0, 0.0, 0) if k == 0 else retuned_label(k)]

        for split_dir in sorted((layout.out / "scores" / g).glob("*_k*")):
            split, k = split_dir.name.split("_k")
            for f in sorted(split_dir.glob("*.json")):
                scores = _read_json(f)
                for task in (t for t in group if t in scores):  # dev: every task; test: the scored ones
                    c = scores[task]["correct"]
                    cells.append({"group": g, "task": task, "split": split, "snapshot": int(k), "adapter": f.stem,
                                  "accuracy": sum(c) / len(c), "loss": sum(scores[task]["loss"]) / len(c), "n": len(c)})

        def arrays(method: str, k: int, task: str, key: str) -> np.ndarray:
            rows = [_read_json(layout.score(g, "test", k, lab))[task][key] for lab in labels(method, k)]
            return np.asarray(rows, dtype=np.float64)

        for task in cfg.scored(group):
            for k in cfg.snapshots:
                acc = {m: arrays(m, k, task, "correct") for m in cfg.methods()}
                for method in cfg.methods():
                    old_acc = arrays(method, 0, task, "correct")  # the re-tuned adapter's is vanilla seed 0's
                    row = {"group": g, "task": task, "snapshot": k, "method": method,
                           "seeds": int(acc[method].shape[0]), "items": int(acc[method].shape[1]),
                           "accuracy": mean_ci(acc[method], draws).to_json(),
                           "loss": mean_ci(arrays(method, k, task, "loss"), draws).to_json(),
                           "retention": ratio_ci(acc[method], old_acc, draws).to_json()}
                    if method == "trans-peft" and k > 0 and cfg.retune:
                        row["gap_closed"] = gap_closed_ci(acc["trans-peft"], acc["vanilla"], acc["retuned"],
                                                          draws).to_json()
                    if method == "trans-peft" and k > 0:
                        row["minus_vanilla"] = bootstrap({"t": acc["trans-peft"], "v": acc["vanilla"]},
                                                         lambda m: m["t"] - m["v"], draws).to_json()
                        # retention of Trans-PEFT minus retention of vanilla, paired over items and seeds
                        row["retention_minus_vanilla"] = retention_difference_ci(
                            acc["trans-peft"], arrays("trans-peft", 0, task, "correct"), acc["vanilla"],
                            arrays("vanilla", 0, task, "correct"), draws).to_json()
                    summary.append(row)
    snap = {m["step"]: m for m in measures}
    for row in summary:
        m = snap[row["snapshot"]]
        row["update"] = {"reference_ppl_change": m["reference_ppl_change"],
                         "heldout_ppl_change": m["heldout_ppl_change"],
                         "weight_change_attention": m["weight_change"].get("attention"),
                         "weight_change_ffn": m["weight_change"].get("ffn")}
    return {"summary": summary, "cells": cells, "adapters": adapters}


def _fmt(e: dict, pct: bool = False) -> str:
    if e is None or e.get("mean") is None:
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.2f}")
    if e.get("low") is None:
        return f(e["mean"])
    return f"{f(e['mean'])} [{f(e['low'])}, {f(e['high'])}]"


def format_results(study: dict) -> str:
    """The results as text tables: one per task, a row per (snapshot, method)."""
    from ..text_table import format_table

    lines = []
    for m in study["update"]["snapshots"]:
        wc = m["weight_change"]
        held = m.get("heldout_ppl_change")
        lines.append(f"snapshot {m['step']}: old-base sample ppl {m['reference_ppl_change']:+.1%}"
                     + (f", held-out docs ppl {held:+.1%}" if held is not None else "")
                     + (f", weight change attention {wc['attention']:.4f}, "
                                                         f"FFN {wc['ffn']:.4f}" if "attention" in wc else ""))
    for g, sel in study["selection"].items():
        lines.append(f"{g}: Trans-PEFT masking {sel['chosen']['masking']:g}, dropping {sel['chosen']['dropping']:g} "
                     f"(old-base dev accuracy {sel['vanilla_dev_accuracy']:.3f} vanilla; chosen by the protocol)")
    tasks = list(dict.fromkeys((r["group"], r["task"]) for r in study["results"]))
    for g, task in tasks:
        rows = [[r["snapshot"], r["method"], _fmt(r["accuracy"], True), _fmt(r["loss"]), _fmt(r["retention"]),
                 _fmt(r.get("retention_minus_vanilla")) if "retention_minus_vanilla" in r else "",
                 _fmt(r.get("gap_closed")) if "gap_closed" in r else ""]
                for r in study["results"] if r["group"] == g and r["task"] == task]
        lines.append(f"\n{task} (adapter trained on {g}; accuracy %, 95% intervals)")
        lines.append(format_table(rows, ["update steps", "method", "accuracy", "answer loss", "retention",
                                         "retention - vanilla's", "gap closed"]))
    return "\n".join(lines)


def draw_chart(study: dict, path: Path) -> Path:
    """Retention against update size, one panel per task, one line per method with its 95% interval band;
    the x axis is the update's steps, labelled with the old-base sample perplexity change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys((r["group"], r["task"]) for r in study["results"]))
    snaps = study["update"]["snapshots"]
    steps = [s["step"] for s in snaps]
    xlabels = [f"{s['step']}\n({s['reference_ppl_change']:+.0%})" for s in snaps]
    colors = {"vanilla": "#4C72B0", "trans-peft": "#DD8452", "retuned": "#55A868"}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, (g, task) in zip(axes[0], tasks):
        for method in METHODS:
            rows = sorted((r for r in study["results"] if r["group"] == g and r["task"] == task
                           and r["method"] == method), key=lambda r: r["snapshot"])
            if not rows:
                continue  # a study without re-tuned adapters
            x = [steps.index(r["snapshot"]) for r in rows]
            y = [r["retention"]["mean"] if r["retention"]["mean"] is not None else float("nan") for r in rows]
            lo = [r["retention"]["low"] if r["retention"]["low"] is not None else v for r, v in zip(rows, y)]
            hi = [r["retention"]["high"] if r["retention"]["high"] is not None else v for r, v in zip(rows, y)]
            chosen = study["selection"][g]["chosen"]
            label = method if method != "trans-peft" else \
                f"trans-peft (masking {chosen['masking']:g}, dropping {chosen['dropping']:g})"
            ax.plot(x, y, marker="o", color=colors[method], label=label)
            ax.fill_between(x, lo, hi, color=colors[method], alpha=0.18, linewidth=0)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels(xlabels, fontsize=8)
        ax.set_xlabel("update steps (old-base sample perplexity change)")
        ax.set_ylabel("retention (accuracy on updated / old base)")
        ax.set_title(f"{task}", fontsize=10)
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(f"Transfer study ({study.get('old_base', '')}, preset {study.get('preset')}, {study.get('seeds')} "
                 f"seeds; bands: 95% paired bootstrap)", fontsize=9)
    return write_png(fig, path)
