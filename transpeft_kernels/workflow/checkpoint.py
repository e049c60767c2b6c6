"""Training checkpoints: everything a run needs to continue to the same final adapter, bit for bit.

A checkpoint holds the trainable parameters, the optimizer and scheduler states, every random state
the step draws from (torch's default generator, which also feeds the patched MLPs' seeds and PEFT's
dropout; the CUDA generators; Python's ``random``), the data order generator and the remaining order of
the current pass, the training log so far, and the run's arguments. It is written as one directory,
atomically (``atomic_io.atomic_dir``), so a run killed while saving keeps the previous checkpoint.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic_io import atomic_dir, recover_dir
from ..errors import UserError

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Checkpointing:
    """directory: where the checkpoint lives; every: save after every this many optimizer steps
    (0: never); arguments: the run's settings, which a resumed run must repeat exactly; resume:
    continue from the checkpoint in ``directory``."""

    directory: Path
    every: int = 0
    arguments: dict | None = None
    resume: bool = False


def save(ck: Checkpointing, model, opt, sched, data_gen: torch.Generator, order: list[int], log) -> None:
    trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {
        "arguments": ck.arguments,
        "step": log.steps,
        "trainable": trainable,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "rng_python": random.getstate(),
        "data_generator": data_gen.get_state(),
        "order": list(order),
        "log": {"steps": log.steps, "losses": list(log.losses), "tokens": log.tokens, "seconds": log.seconds},
    }
    with atomic_dir(ck.directory) as tmp:
        torch.save(state, tmp / STATE_FILE)


def load(ck: Checkpointing) -> dict:
    """The checkpoint's state, after checking it belongs to a run with the same arguments."""
    recover_dir(ck.directory)  # a run killed while replacing the checkpoint left the previous one aside
    path = Path(ck.directory) / STATE_FILE
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint in {ck.directory} (start without --resume, "
                        "with --checkpoint-every N to write one)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: say so in one line
        raise UserError(f"--resume: cannot read the checkpoint {path}: {type(e).__name__}: {e}") from None
    theirs = state.get("arguments") or {}
    if ck.arguments is not None and theirs != ck.arguments:
        differ = sorted(k for k in set(theirs) | set(ck.arguments) if theirs.get(k) != ck.arguments.get(k))
        shown = ", ".join(f"{k} (checkpoint {theirs.get(k)!r}, now {ck.arguments.get(k)!r})" for k in differ[:4])
        raise UserError(f"--resume: the checkpoint in {ck.directory} is of a run with other arguments: {shown}")
    return state


def restore(state: dict, model, opt, sched, data_gen: torch.Generator, log) -> list[int]:
    """Put ``state`` back into the run; returns the remaining data order of the current pass."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    random.setstate(state["rng_python"])
    data_gen.set_state(state["data_generator"])
    saved = state["log"]
    log.steps, log.losses, log.tokens, log.seconds = saved["steps"], list(saved["losses"]), saved["tokens"], saved["seconds"]
    return list(state["order"])
