"""Training loops: a LoRA adapter on a (patched) PEFT model, and full-weight continual training of a base.

Batches are left-padded with explicit position ids, so padding changes nothing, and the LM head is applied
only to the positions that have a target (``logits_to_keep``): for prompt/completion data that is the
short completion, which skips most of the vocabulary projection (a large share of a small model's step).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .data import TEXT, Dataset

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels of one training/eval sequence (labels IGNORE where there is no target)."""

    input_ids: list[int]
    labels: list[int]


def encode(dataset: Dataset, tokenizer, max_length: int) -> list[Encoded]:
    """Tokenize ``dataset``: text records are split into windows of ``max_length`` tokens ending in EOS and
    trained on every token; prompt/completion records are prompt + completion + EOS with targets on the
    completion and EOS only (the prompt is cut from the left when the whole does not fit)."""
    if max_length < 4:
        raise ValueError(f"max_length: expected at least 4, got {max_length}")
    eos = tokenizer.eos_token_id
    out: list[Encoded] = []
    for ex in dataset.examples:
        if dataset.kind == TEXT:
            ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"] + [eos]
            for start in range(0, len(ids), max_length):
                window = ids[start:start + max_length]
                if len(window) >= 2:
                    out.append(Encoded(window, list(window)))
        else:
            prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
            target = tokenizer(ex.completion, add_special_tokens=False)["input_ids"][: max_length - 2] + [eos]
            prompt = prompt[-(max_length - len(target)):]
            out.append(Encoded(prompt + target, [IGNORE] * len(prompt) + target))
    return out


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded tensors: input_ids, attention_mask, position_ids (0 at each row's first real token), labels."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, width - n:] = torch.tensor(e.input_ids)
        labels[row, width - n:] = torch.tensor(e.labels)
        mask[row, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def target_logits(model, batch: dict[str, torch.Tensor], first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits [B, T, V], targets [B, T]) of the positions from label column ``first`` on, for a
    left-padded batch on the model's device: only those logits are computed (``logits_to_keep``)."""
    labels = batch["labels"]
    width = labels.shape[1]
    # Position t predicts token t+1: the first target needs the logits of position first-1.
    keep = width - max(first - 1, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False).logits
    return logits[:, :-1].float(), labels[:, width - keep + 1:]


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over the labelled tokens, their count) for one batch."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    labelled = (batch["labels"] != IGNORE).any(0).nonzero()
    if labelled.numel() == 0:
        return torch.zeros((), device=device), 0
    logits, targets = target_logits(model, batch, int(labelled[0]))
    count = int((targets != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, count


@dataclass
class TrainLog:
    """What a training run did: per optimizer step the mean token loss, and the throughput."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # every real (non-pad) token processed
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        d["first_loss"] = self.losses[0] if self.losses else None
        d["last_loss"] = self.losses[-1] if self.losses else None
        return d


@dataclass(frozen=True)
class LoopConfig:
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0


def plan_steps(n_items: int, cfg: LoopConfig) -> int:
    """Number of optimizer steps: ``epochs`` passes over the data, capped by ``max_steps``."""
    per_epoch = math.ceil(n_items / (cfg.batch_size * cfg.grad_accum))
    steps = max(1, math.ceil(per_epoch * cfg.epochs))
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


def train_loop(model, items: list[Encoded], pad_id: int, cfg: LoopConfig, desc: str = "train",
               progress: bool = True, checkpointing=None) -> TrainLog:
    """AdamW over the trainable parameters of ``model`` with linear warm-up and linear decay to zero.
    Micro-batches are drawn from a reshuffle of ``items`` per epoch (generator seeded by ``cfg.seed``);
    gradients are averaged over the labelled tokens of each optimizer step.
    ``checkpointing`` (workflow.checkpoint.Checkpointing): save every N steps and/or resume from the
    last checkpoint; a resumed run ends with the same parameters as an uninterrupted one."""
    from . import checkpoint as ckpt
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: nothing is trainable")
    steps = plan_steps(len(items), cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / cfg.warmup_steps if s < cfg.warmup_steps
        else max(0.0, (steps - s) / max(1, steps - cfg.warmup_steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []

    def next_micro() -> list[Encoded]:
        nonlocal order
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(items), generator=gen).tolist()
        take, order = order[:cfg.batch_size], order[cfg.batch_size:]
        return [items[i] for i in take]

    log = TrainLog()
    if checkpointing is not None and checkpointing.resume:
        order = ckpt.restore(ckpt.load(checkpointing), model, opt, sched, gen, log)
    model.train()
    start = time.perf_counter() - log.seconds
    bar = tqdm(range(log.steps, steps), desc=desc, disable=not progress, dynamic_ncols=True,
               initial=log.steps, total=steps)
    for _ in bar:
        micro = [collate(next_micro(), pad_id) for _ in range(cfg.grad_accum)]
        total = sum(int((b["labels"] != IGNORE).sum()) for b in micro)
        step_loss = 0.0
        for batch in micro:
            loss_sum, _ = token_losses(model, batch)
            (loss_sum / max(total, 1)).backward()
            step_loss += loss_sum.item()
            log.tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.steps += 1
        log.losses.append(step_loss / max(total, 1))
        bar.set_postfix(loss=f"{log.losses[-1]:.3f}")
        if checkpointing is not None and checkpointing.every and log.steps % checkpointing.every == 0 \
                and log.steps < steps:
            log.seconds = time.perf_counter() - start
            ckpt.save(checkpointing, model, opt, sched, gen, order, log)
    log.seconds = time.perf_counter() - start
    model.eval()
    return log


@dataclass(frozen=True)
class AdapterConfig:
    """A LoRA adapter and the Trans-PEFT interventions it is trained with (0 and 0: vanilla LoRA)."""

    r: int = 16
    alpha: float = 32
    targets: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.05
    masking: float = 0.0
    dropping: float = 0.0
    backend: str = "auto"
    gradient_checkpointing: bool = False


def add_adapter(model, cfg: AdapterConfig):
    """A PeftModel with a fresh LoRA adapter around ``model`` (injected in place), patched with
    ``transpeft_kernels.patch`` when masking or dropping is on. Returns (peft model, patch report or None)."""
    from peft import LoraConfig, get_peft_model

    from ..integration import patch

    targets = cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad and recomputes our masks exactly.
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = None
    if cfg.masking > 0 or cfg.dropping > 0:
        report = patch(peft_model, masking=cfg.masking, dropping=cfg.dropping, backend=cfg.backend)
    return peft_model, report


def train_adapter(model, tokenizer, dataset: Dataset, adapter: AdapterConfig, loop: LoopConfig, max_length: int,
                  desc: str = "adapter", progress: bool = True, checkpointing=None):
    """Train one LoRA adapter on ``model`` (modified in place: it gains the adapter). Returns
    (peft model, TrainLog, patch report or None); the model is unpatched and in eval mode afterwards."""
    from ..integration import unpatch

    torch.manual_seed(loop.seed)
    items = encode(dataset, tokenizer, max_length)
    peft_model, report = add_adapter(model, adapter)
    try:
        log = train_loop(peft_model, items, tokenizer.pad_token_id, loop, desc=desc, progress=progress,
                         checkpointing=checkpointing)
    finally:
        if report is not None:
            unpatch(peft_model)
        if adapter.gradient_checkpointing:
            peft_model.gradient_checkpointing_disable()
    log.settings = {"adapter": _plain(asdict(adapter)), "loop": asdict(loop), "max_length": max_length,
                    "examples": len(dataset), "sequences": len(items)}
    return peft_model, log, report


def continual_training(model, tokenizer, dataset: Dataset, loop: LoopConfig, max_length: int,
                       desc: str = "base update", progress: bool = True) -> TrainLog:
    """Train every weight of ``model`` in place on ``dataset`` (a stand-in for a base-model version update)."""
    torch.manual_seed(loop.seed)
    for p in model.parameters():
        p.requires_grad_(True)
    items = encode(dataset, tokenizer, max_length)
    log = train_loop(model, items, tokenizer.pad_token_id, loop, desc=desc, progress=progress)
    for p in model.parameters():
        p.requires_grad_(False)
    log.settings = {"loop": asdict(loop), "max_length": max_length, "sequences": len(items)}
    return log


def _plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
