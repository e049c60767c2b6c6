"""The demo: the transfer study's most informative point, with its interval and a plain answer.

Does an adapter trained on an old base keep working once the base is updated, and does Trans-PEFT keep more
than vanilla LoRA? The demo runs the transfer study (``study.py``: one definition of the update, the tasks,
the adapters, the scoring, the selection protocol and the bootstrap) at a size that answers that question for
ONE point, then says what it found:

- ``quick`` (what ``./run.sh`` runs; sized for at most 12 minutes on 2 CPU cores: 8 min 19 s measured on 2 idle
  cores, README): the ``cpu`` study preset reduced to its
  most informative point, the old base and its LARGEST update (200 steps: the update that costs vanilla the
  most, so the one where Trans-PEFT has the most to keep), one seed, the Trans-PEFT setting fixed in advance
  (chosen by the cpu study's rule from old-base DEV accuracy only; its dev accuracy is re-measured and shown),
  both tasks scored on their 500 test items each (the adapters are the study's seed-0 adapters), the answer
  given for the task on which vanilla kept least, the full demo's rule. What the 12 minutes cannot buy is left
  to the full study: the re-tuned
  upper bound (about 1.5 more minutes), the held-out docs perplexity, other update sizes, seeds and the grid;
- ``full``: the whole study preset of the device (``cpu``: 4 update sizes, 3 seeds, the selection over the
  grid, about 1 hour on 2 cores, 56 minutes measured; ``gpu`` on CUDA), and the same report for its most informative point.

The point is the largest update, and among the tasks scored the one on which vanilla kept the least. Reported:
accuracy and answer loss of vanilla, Trans-PEFT (and the re-tuned adapter) on the old and the updated base,
retention (updated / old accuracy), and Trans-PEFT's retention minus vanilla's with a 95% paired bootstrap
interval over test items (and seeds), then one paragraph in plain words. Files in ``--out``: the study's cells
(a killed demo continues from its finished cells: each is written atomically), ``study.json``,
``results.json`` (``rows`` of adapter, base, accuracy, loss; the estimates; the answer) and ``results.png``
(only with matplotlib; without it everything else is written and one line says how to get the chart).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..atomic_io import atomic_write_json
from .study import PRESETS as STUDY_PRESETS
from .study import StudyConfig, adapter_label, retuned_label, run_study

# The quick demo's Trans-PEFT setting, fixed before any updated base is scored: the setting the cpu study's
# rule chose from old-base dev accuracy (the strongest of masking {0.02, 0.05, 0.1} x dropping {0, 0.02} within
# 2 points of vanilla's mean dev accuracy over facts and words, 0.807, in the cpu study run of 2026-12-03:
# masking 0.02: 0.813, 0.02 + dropping 0.02: 0.790, 0.05: 0.790, 0.05 + 0.02: 0.747, 0.1: 0.783, 0.1 + 0.02:
# 0.687; its selection_facts+words.json). The demo re-measures the dev accuracy and says if it still qualifies.
QUICK_MASKING, QUICK_DROPPING = 0.05, 0.0

# Where the committed full study is (relative to the repository root).
FULL_STUDY = Path("benchmarks") / "results" / "study_cpu" / "study.json"
README_SECTION = "README.md, section 'The transfer study'"


def point_config(study: StudyConfig, name: str, masking: float, dropping: float, tasks: tuple[str, ...] = (),
                 retune: bool = False) -> StudyConfig:
    """``study`` reduced to one update: the old base and the largest update, one seed, one fixed Trans-PEFT
    setting, ``tasks`` (default: every task) scored on the test split, the point reported being the task on
    which vanilla kept least (``most_informative``); the update's size is measured by the drift of the old
    base's own samples and the weight change (not the held-out docs perplexity: a minute of CPU). Everything
    else (data, adapters, training, update) is the study's, so the adapters and snapshot are its seed-0 ones."""
    scored = ", ".join(tasks) if tasks else "every task"
    return replace(study, preset=name, snapshots=(0, max(study.snapshots)), seeds=1, grid_masking=(masking,),
                   grid_dropping=(dropping,), scored_tasks=tuple(tasks), measure_heldout=False, retune=retune,
                   notes=(f"the {study.preset} study reduced to its largest update ({max(study.snapshots)} steps), "
                          f"seed 0, the Trans-PEFT setting fixed from old-base dev accuracy, {scored} scored on the "
                          f"test split; the point reported is the task on which vanilla kept least",))


PRESETS = {
    "quick": point_config(STUDY_PRESETS["cpu"], "demo-quick", QUICK_MASKING, QUICK_DROPPING),
    # Tests only: the tiny study's point, seconds end to end.
    "tiny": point_config(STUDY_PRESETS["tiny"], "demo-tiny", 0.1, 0.0),
}


def config_for(mode: str, cuda: bool) -> StudyConfig:
    """The configuration of a demo mode: ``quick``, ``tiny`` or ``full`` (the device's whole study preset)."""
    if mode == "full":
        return STUDY_PRESETS["gpu" if cuda else "cpu"]
    return PRESETS[mode]


def most_informative(study: dict) -> tuple[str, str, int]:
    """(group, task, update steps) of the point to report: the largest update and, among the tasks scored,
    the one on which vanilla kept the least of its accuracy."""
    k = max(s["step"] for s in study["update"]["snapshots"])
    rows = [r for r in study["results"] if r["snapshot"] == k and r["method"] == "vanilla"]
    if not rows:
        raise ValueError("the study has no results at its largest update")
    kept = lambda r: r["retention"]["mean"] if r["retention"]["mean"] is not None else float("inf")  # noqa: E731
    best = min(rows, key=kept)
    return best["group"], best["task"], k


def point_of(study: dict) -> dict:
    """Everything the demo reports about its point, from study.json."""
    g, task, k = most_informative(study)

    def row(method: str, step: int) -> dict:
        return next(r for r in study["results"]
                    if r["group"] == g and r["task"] == task and r["snapshot"] == step and r["method"] == method)

    sel = study["selection"][g]
    chosen = sel["chosen"]
    tp_dev = next(c for c in sel["candidates"]
                  if c["masking"] == chosen["masking"] and c["dropping"] == chosen["dropping"])
    measure = next(s for s in study["update"]["snapshots"] if s["step"] == k)
    methods = {}
    present = {r["method"] for r in study["results"]}
    for method, name in (("vanilla", "vanilla"), ("trans-peft", "trans-peft"), ("retuned", "retuned-on-new")):
        if method not in present:
            continue  # no re-tuned adapter in this configuration
        old, new = row(method, 0), row(method, k)
        methods[name] = {"old": {"accuracy": old["accuracy"], "loss": old["loss"]},
                         "new": {"accuracy": new["accuracy"], "loss": new["loss"]},
                         "retention": new["retention"]}
    tp = row("trans-peft", k)
    return {"group": g, "task": task, "task_description": study["tasks"][task]["description"], "update_steps": k,
            "update": {key: measure.get(key) for key in ("reference_ppl_change", "heldout_ppl_change",
                                                         "weight_change")},
            "items": tp["items"], "seeds": tp["seeds"], "methods": methods,
            "retention_minus_vanilla": tp.get("retention_minus_vanilla"),
            "accuracy_minus_vanilla": tp.get("minus_vanilla"), "gap_closed": tp.get("gap_closed"),
            "trans_peft_setting": {"masking": chosen["masking"], "dropping": chosen["dropping"],
                                   "qualified": sel["qualified"], "tolerance": sel["tolerance"],
                                   "dev_accuracy": tp_dev["dev_accuracy"],
                                   "vanilla_dev_accuracy": sel["vanilla_dev_accuracy"],
                                   "candidates": len(sel["candidates"])}}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def plain_answer(point: dict, full_study: str) -> str:
    """One paragraph: did Trans-PEFT keep more than vanilla at this point, by how much, with what confidence,
    and where the full study's results are."""
    m = point["methods"]
    v, t, r = m["vanilla"], m["trans-peft"], m.get("retuned-on-new")
    s = point["trans_peft_setting"]
    d = point["retention_minus_vanilla"] or {"mean": None, "low": None, "high": None}
    size = f"{point['items']} test items" + (f" and {point['seeds']} seeds" if point["seeds"] > 1 else ", one seed")
    ppl = point["update"].get("reference_ppl_change")
    update = (f"a base update of {point['update_steps']} steps of continual training on Python docstrings"
              + (f" (perplexity of the old base's own samples {ppl:+.0%})" if ppl is not None else ""))
    setting = (f"Trans-PEFT (masking {s['masking']:g}, dropping {s['dropping']:g}, "
               + (f"fixed from old-base dev accuracy: {_pct(s['dev_accuracy'])} vs vanilla's "
                  f"{_pct(s['vanilla_dev_accuracy'])})"))
    parts = [f"On the {point['task']} task after {update}, vanilla LoRA went from {_pct(v['old']['accuracy']['mean'])} "
             f"to {_pct(v['new']['accuracy']['mean'])} (retention {_pct(v['retention']['mean'])}) and {setting} "
             f"went from {_pct(t['old']['accuracy']['mean'])} to {_pct(t['new']['accuracy']['mean'])} (retention "
             f"{_pct(t['retention']['mean'])})"
             + (f"; an adapter re-tuned on the updated base reaches {_pct(r['new']['accuracy']['mean'])}." if r
                else ".")]
    mean, low, high = (None if d[key] is None else 100 * d[key] for key in ("mean", "low", "high"))
    if mean is None or low is None:
        parts.append("The difference in retention has no interval here (an old-base accuracy of 0 leaves retention "
                     "undefined), so this point cannot answer the question.")
    elif low > 0:
        parts.append(f"Yes: Trans-PEFT kept {mean:.1f} points more of its accuracy than vanilla, 95% interval "
                     f"{low:+.1f} to {high:+.1f} points over {size}; the interval excludes 0, so the difference is "
                     f"detectable at this size.")
    elif high < 0:
        parts.append(f"No: Trans-PEFT kept {-mean:.1f} points less of its accuracy than vanilla, 95% interval "
                     f"{low:+.1f} to {high:+.1f} points over {size}; the interval excludes 0, so vanilla kept "
                     f"detectably more here.")
    else:
        parts.append(f"Trans-PEFT's retention minus vanilla's is {mean:+.1f} points, 95% interval {low:+.1f} to "
                     f"{high:+.1f} over {size}: the interval includes 0, so there is no detectable difference at "
                     f"this size.")
    vr = v["retention"]
    if vr.get("high") is not None and vr["high"] >= 1.0:
        parts.append("The update did not cost vanilla a detectable share of its accuracy (its retention interval "
                     "reaches 100%), so there was little for Trans-PEFT to keep.")
    if not s["qualified"]:
        which = "The fixed Trans-PEFT setting was not" if s.get("candidates", 1) == 1 else "No Trans-PEFT setting was"
        parts.append(f"{which} within {100 * s['tolerance']:.0f} points of vanilla's old-base dev accuracy, so the "
                     f"comparison starts from a weaker Trans-PEFT adapter.")
    parts.append("The full study (every update size, both tasks, several seeds, the setting chosen from a grid"
                 + ("" if r else ", the re-tuned upper bound") + f") is in {full_study} and {README_SECTION}.")
    return " ".join(parts)


def _full_study_location(out: Path, cfg: StudyConfig) -> str:
    if cfg.preset in STUDY_PRESETS:  # this run is a whole study
        return f"{out / 'study.json'} (this run)"
    repo = Path(__file__).resolve().parents[2]
    if (repo / FULL_STUDY).is_file():
        return str(FULL_STUDY)
    return (f"{FULL_STUDY} (not in this checkout yet: python -m transpeft_kernels study --preset cpu "
            f"writes it)")


def run_demo(cfg: StudyConfig, out: Path, seeds: int | None = None, progress: bool = True, log=print) -> dict:
    """Run (or continue) the demo in ``out``; returns the results dict also written to ``out/results.json``."""
    from .chart import save_chart

    started = time.perf_counter()
    study = run_study(cfg, out, seeds=seeds, progress=progress, log=log, chart=False)
    point = point_of(study)
    g, k = point["group"], point["update_steps"]
    rows = [{"adapter": name, "base": base, "accuracy": res[base]["accuracy"]["mean"],
             "loss": res[base]["loss"]["mean"]} for name, res in point["methods"].items() for base in ("old", "new")
            if not (name == "retuned-on-new" and base == "old")]  # the re-tuned adapter exists on the new base only
    chosen = point["trans_peft_setting"]
    labels = {"vanilla": [adapter_label(0.0, 0.0, s) for s in range(study["seeds"])],
              "trans-peft": [adapter_label(chosen["masking"], chosen["dropping"], s) for s in range(study["seeds"])],
              "retuned-on-new": [retuned_label(k)] if "retuned-on-new" in point["methods"] else []}
    full_study = _full_study_location(out, cfg)
    answer = plain_answer(point, full_study)
    results = {
        "question": study["question"],
        "answer": answer,
        "mode": cfg.preset,
        "rows": rows,
        "retention": {name: res["retention"]["mean"] for name, res in point["methods"].items()},
        "point": point,
        "old_base": study["old_base"],
        "new_base": {"update_steps": k, "snapshot": str(out / "update" / f"step_{k}.safetensors"),
                     **next(s for s in study["update"]["snapshots"] if s["step"] == k)},
        "task": {"name": point["task"], "description": point["task_description"], "test_items": point["items"],
                 "data": str(out / "data")},
        "adapters": {name: {lab: study["adapters"].get(f"{g}/{lab}") for lab in labs} for name, labs in labels.items()
                     if labs},
        "protocol": study["protocol"],
        "full_study": full_study,
        "study": str(out / "study.json"),
        "timings_s": {**study["timings_s"], "demo total": round(time.perf_counter() - started, 1)},
        "environment": study["environment"],
    }
    atomic_write_json(out / "results.json", results, indent=2)
    try:
        chart = f", chart: {save_chart(results, out / 'results.png')}"
    except ImportError:
        chart = ""
        log("no chart: matplotlib is not installed (pip install matplotlib, then rerun the same command: "
            "finished cells are reused)")
    phases = ", ".join(f"{name} {sec:.0f} s" for name, sec in study["timings_s"].items() if name != "total")
    log(f"results: {out / 'results.json'}{chart} ({time.perf_counter() - started:.0f} s in all: {phases})")
    log("")
    log(answer)
    return results
