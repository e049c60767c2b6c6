"""The ``train`` and ``transfer`` commands as functions: every input is checked first (paths, data fields,
configs, tokenizers, adapter shapes, settings), and only then are weights loaded and work started."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..atomic_io import atomic_files, atomic_write_json
from ..errors import UserError


def require(module: str, why: str) -> None:
    """UserError naming the pip package when an optional dependency is missing (checked before any work)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{module} is not installed ({why}): pip install {module}")


def _probability(name: str, value: float, upper_inclusive: bool) -> None:
    from ..specs import check_probability

    try:
        check_probability(name, value, upper_inclusive)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not 0 < value < math.inf:  # NaN and inf fail too
        raise UserError(f"{name}: expected a positive finite number, got {value}")


def _max_length(value) -> None:
    _positive("--max-length", value)
    if value < 4:  # a prompt token, a completion token and EOS at least (training.encode)
        raise UserError(f"--max-length: expected at least 4 tokens, got {value}")


def check_writable(argument: str, path: Path) -> None:
    """UserError unless files can be made in the directory ``path``, or in its nearest existing parent when it
    does not exist yet. Tried with an unnamed temporary file: permission bits do not stop root, and a read-only
    mount stops everyone."""
    import tempfile

    here = path
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise UserError(f"{argument}: cannot create {path}: {here} is not a directory")
    try:
        tempfile.TemporaryFile(dir=here).close()
    except OSError as e:
        raise UserError(f"{argument}: cannot write in {here}: {e.strerror or e}") from None


@dataclass(frozen=True)
class TrainRequest:
    base: str
    data: str
    out: str
    masking: float = 0.0
    dropping: float = 0.0
    r: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.05
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    backend: str = "auto"
    max_length: int = 512
    seed: int = 0
    progress: bool = True
    checkpoint_every: int = 0
    resume: bool = False

    def arguments(self) -> dict:
        """What must be the same for ``--resume`` to continue this run (not where or how it reports)."""
        from dataclasses import asdict

        d = asdict(self)
        for k in ("out", "progress", "checkpoint_every", "resume"):
            d.pop(k)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        # The same files however they are spelled; the data by content, as it is cheap to hash.
        d["base"] = str(Path(self.base).resolve())
        d["data"] = str(Path(self.data).resolve())
        import hashlib

        try:
            d["data_sha256"] = hashlib.sha256(Path(self.data).read_bytes()).hexdigest()
        except OSError:  # reported by the data check, which names the argument
            d["data_sha256"] = None
        return d


def _check_targets(targets, shapes: dict, base_name: str) -> None:
    if list(targets) == ["all-linear"]:
        return
    names = {n.rsplit(".", 1)[-1] for n in shapes}
    missing = [t for t in targets if t not in names]
    if missing:
        raise UserError(f"--targets: {base_name} has no linear layers named {missing}; "
                        f"it has {sorted(names)} (or use all-linear)")


def train(req: TrainRequest, log=print) -> dict:
    """Train one adapter as ``req`` says; writes the PEFT adapter and ``train_log.json`` to ``req.out``."""
    from ..ops import check_available, validate_backend_name
    from .bases import load_config, load_model, load_tokenizer, module_shapes, resolve_base
    from .data import load_jsonl
    from .training import AdapterConfig, LoopConfig, train_adapter

    require("peft", "adapters are PEFT LoRA adapters")
    _probability("--masking", req.masking, upper_inclusive=False)
    _probability("--dropping", req.dropping, upper_inclusive=True)
    _probability("--lora-dropout", req.lora_dropout, upper_inclusive=False)
    for name, value in (("--r", req.r), ("--alpha", req.alpha), ("--epochs", req.epochs), ("--lr", req.lr),
                        ("--batch-size", req.batch_size), ("--grad-accum", req.grad_accum)):
        _positive(name, value)
    _max_length(req.max_length)
    _positive("--max-steps", req.max_steps, allow_none=True)
    if not isinstance(req.checkpoint_every, int) or req.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every: expected a number of steps >= 0 (0: no checkpoints), got {req.checkpoint_every}")
    try:
        backend = validate_backend_name(req.backend)
        if backend != "auto" and (req.masking > 0 or req.dropping > 0):
            check_available(backend)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--backend: {e}") from None
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    dataset = load_jsonl(req.data, "--data")
    spec = resolve_base(req.base, "--base")
    config = load_config(spec)
    tokenizer = load_tokenizer(spec)
    _check_targets(req.targets, module_shapes(config), spec.display)
    from .checkpoint import Checkpointing, load as load_checkpoint

    checkpointing = None
    if req.checkpoint_every or req.resume:
        checkpointing = Checkpointing(out / "checkpoint", req.checkpoint_every, req.arguments(), req.resume)
    if req.resume:
        load_checkpoint(checkpointing)  # a missing or mismatched checkpoint fails here, before any weights load
    check_writable("--out", out)  # created once the base has loaded: a base that fails to load leaves nothing

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(spec).to(device)
    out.mkdir(parents=True, exist_ok=True)
    log(f"base: {spec.display} ({config.model_type}, {config.num_hidden_layers} layers); data: {dataset.source} "
        f"({len(dataset)} {dataset.kind} records)")
    targets = "all-linear" if list(req.targets) == ["all-linear"] else tuple(req.targets)
    adapter = AdapterConfig(r=req.r, alpha=req.alpha, targets=targets,
                            lora_dropout=req.lora_dropout, masking=req.masking, dropping=req.dropping,
                            backend=req.backend, gradient_checkpointing=req.gradient_checkpointing)
    loop = LoopConfig(lr=req.lr, epochs=req.epochs, max_steps=req.max_steps, batch_size=req.batch_size,
                      grad_accum=req.grad_accum, seed=req.seed)
    peft_model, train_log, report = train_adapter(model, tokenizer, dataset, adapter, loop, req.max_length,
                                                  desc="train", progress=req.progress, checkpointing=checkpointing)
    log(str(report) if report is not None else "not patched: masking = dropping = 0 (vanilla LoRA)")
    record = train_log.to_json()
    record.update(base=spec.display, data=str(req.data), patch_report=None if report is None else str(report))
    # One publish for the adapter and its log, the config last: a directory with adapter_config.json
    # holds a whole adapter, and the log beside it is that adapter's.
    with atomic_files(out, last=("adapter_config.json",)) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / "train_log.json", record, indent=2)
    log(f"loss {record['first_loss']:.4f} -> {record['last_loss']:.4f} over {train_log.steps} steps, "
        f"{train_log.tokens_per_s:,.0f} tokens/s; adapter and train_log.json in {out}")
    return record


@dataclass(frozen=True)
class TransferRequest:
    old_base: str
    new_base: str
    data: str
    adapters: tuple[str, ...]
    json_out: str | None = None
    min_retention: float | None = None
    max_length: int = 512
    batch_size: int = 16
    progress: bool = True


def transfer(req: TransferRequest, log=print) -> tuple[dict, bool]:
    """Evaluate every adapter on both bases; returns (results, whether every retention passed the gate)."""
    import torch

    from .bases import load_config, load_model, load_tokenizer, module_shapes, resolve_base
    from .data import load_jsonl
    from .transfer import check_adapter, check_adapter_config, evaluate_adapters, format_table, read_adapter, retention

    require("peft", "adapters are loaded with PEFT")
    if not req.adapters:
        raise UserError("ADAPTER_DIR: give at least one adapter directory")
    if req.min_retention is not None and (math.isnan(req.min_retention) or req.min_retention < 0):
        raise UserError(f"--min-retention: expected a non-negative number, got {req.min_retention}")
    _max_length(req.max_length)
    _positive("--batch-size", req.batch_size)
    if req.json_out is not None:
        parent = Path(req.json_out).resolve().parent
        if not parent.is_dir():
            raise UserError(f"--json: the directory {parent} does not exist")
        if Path(req.json_out).is_dir():
            raise UserError(f"--json: {req.json_out} is a directory (give a file name)")
        check_writable("--json", parent)
    dataset = load_jsonl(req.data, "--data")
    bases, configs = {}, {}
    for label, path, arg in (("old", req.old_base, "--old-base"), ("new", req.new_base, "--new-base")):
        spec = resolve_base(path, arg)
        configs[label] = load_config(spec)
        bases[label] = (spec, load_tokenizer(spec), module_shapes(configs[label]))
    infos = [read_adapter(a) for a in req.adapters]
    for info in infos:
        for label, (spec, _, shapes) in bases.items():
            check_adapter(info, shapes, spec.display)
            check_adapter_config(info, configs[label], spec.display)

    names = {str(info.path): info.path for info in infos}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evaluated = {}
    for label, (spec, tokenizer, _) in bases.items():
        model = load_model(spec).to(device)
        evaluated[label] = evaluate_adapters(model, tokenizer, names, dataset, req.max_length, req.batch_size,
                                             base_label=f"{label} base", progress=req.progress)
        del model
    results = {"adapters": [], "data": str(req.data), "old_base": bases["old"][0].display,
               "new_base": bases["new"][0].display, "min_retention": req.min_retention}
    passed = True
    rows = []
    for name in names:
        old, new = evaluated["old"][name], evaluated["new"][name]
        kept = retention(old, new)
        ok = req.min_retention is None or (kept is not None and kept >= req.min_retention)
        passed &= ok
        results["adapters"].append({"path": name, "old": {"loss": old["loss"], "accuracy": old["accuracy"]},
                                    "new": {"loss": new["loss"], "accuracy": new["accuracy"]}, "retention": kept})
        rows.append([name, old["loss"], new["loss"], old["accuracy"], new["accuracy"], kept,
                     "" if req.min_retention is None else ("ok" if ok else "FAIL")])
    log(format_table(rows, ["adapter", "loss old", "loss new", "acc old", "acc new", "retention", "gate"]))
    if req.json_out is not None:
        atomic_write_json(req.json_out, results, indent=2)
    if not passed:
        failing = [a["path"] for a in results["adapters"]
                   if a["retention"] is None or a["retention"] < req.min_retention]
        log(f"retention below {req.min_retention} (or undefined) for: {', '.join(failing)}")
    return results, passed
