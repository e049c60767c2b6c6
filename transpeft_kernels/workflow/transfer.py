"""Checking existing PEFT adapters against bases, and evaluating them on an old and a new base.

``check_adapter`` reads only the adapter's config and tensor headers and the base's config (a meta-device
model), so a mismatched adapter is reported before any weights load. Retention is new / old accuracy when
the data has completions, otherwise the perplexity ratio exp(old loss - new loss); 1 means nothing lost.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..text_table import format_table  # noqa: F401  (the commands' tables)
from .data import Dataset
from .evaluation import evaluate

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    weights: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]  # tensor name in the saved file -> shape


def read_adapter(path: str | Path, argument: str = "ADAPTER_DIR") -> AdapterInfo:
    """Config and tensor shapes of a saved PEFT adapter directory (no tensor data is read for safetensors)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{argument}: {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{argument}: {path} is not a directory (a PEFT adapter is a directory with adapter_config.json)")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{argument}: {path} has no adapter_config.json (not a PEFT adapter)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an int of 5000 digits
        raise UserError(f"{argument}: cannot read {cfg_path}: {e}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError(f"{argument}: {cfg_path} is not a PEFT adapter config (no peft_type)")
    weights = next((path / n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise UserError(f"{argument}: {path} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        else:
            import torch

            state = torch.load(weights, map_location="cpu", weights_only=True)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
    except Exception as e:
        raise UserError(f"{argument}: cannot read the adapter weights {weights}: {e}") from None
    return AdapterInfo(path, weights, config, shapes)


def _module_of(key: str) -> tuple[str, str] | None:
    """(module name in the causal LM, 'A' or 'B') of a saved LoRA tensor name, or None for other tensors."""
    for part, which in ((".lora_A.", "A"), (".lora_B.", "B")):
        if part in key:
            module = key.split(part)[0]
            for prefix in ("base_model.model.", "base_model."):
                if module.startswith(prefix):
                    module = module[len(prefix):]
                    break
            return module, which
    return None


def check_adapter(info: AdapterInfo, base_shapes: dict[str, tuple[int, int]], base_name: str,
                  argument: str = "ADAPTER_DIR") -> None:
    """Raise UserError unless every LoRA tensor of the adapter matches a linear layer of the base: the
    module exists (same architecture) and its input/output sizes agree (same hidden/intermediate sizes)."""
    lora = [(k, m) for k, m in ((k, _module_of(k)) for k in info.shapes) if m is not None]
    if not lora:
        raise UserError(f"{argument}: {info.path} holds no LoRA weights (only LoRA adapters are supported)")
    for key, (module, which) in lora:
        if module not in base_shapes:
            raise UserError(f"{argument}: {info.path} does not fit the base {base_name}: it adapts '{module}', which "
                            f"the base does not have (an adapter for another architecture?)")
        in_f, out_f = base_shapes[module]
        shape = info.shapes[key]
        if len(shape) != 2:
            continue
        want, got, what = (in_f, shape[1], "input") if which == "A" else (out_f, shape[0], "output")
        if want != got:
            raise UserError(f"{argument}: {info.path} does not fit the base {base_name}: '{module}' has {what} size "
                            f"{got} in the adapter and {want} in the base (an adapter for another hidden size?)")


def check_adapter_config(info: AdapterInfo, base_config, base_name: str, argument: str = "ADAPTER_DIR") -> None:
    """Raise UserError unless PEFT can build the LoRA adapter that ``adapter_config.json`` describes on the base
    (on the meta device: no memory, no weights) with the shapes of the saved tensors. Catches what loading would
    otherwise fail on after the bases' weights load: fields of the wrong type, another rank than the tensors'."""
    import torch
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from .bases import _first_line

    cfg_path = info.path / "adapter_config.json"
    peft_type, r = info.config.get("peft_type"), info.config.get("r", 8)
    if peft_type != "LORA":
        raise UserError(f"{argument}: {cfg_path} has peft_type {peft_type!r}; only LoRA adapters (\"LORA\") are supported")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"{argument}: {cfg_path}: 'r' (the LoRA rank) must be a positive integer, got {r!r}")
    try:
        with torch.device("meta"):
            model = PeftModel(AutoModelForCausalLM.from_config(base_config), PeftConfig.from_pretrained(str(info.path)))
        built = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    except Exception as e:  # PEFT raises TypeError, ValueError, KeyError, AttributeError... for bad fields
        raise UserError(f"{argument}: {cfg_path} is not a LoRA config PEFT can apply to {base_name}: "
                        f"{_first_line(e)}") from None
    for key, shape in info.shapes.items():
        if key in built and built[key] != shape:
            raise UserError(f"{argument}: {info.weights} does not match {cfg_path.name}: '{key}' has shape "
                            f"{list(shape)} in the file and {list(built[key])} by the config (another rank?)")


def retention(old: dict, new: dict) -> float | None:
    """new/old accuracy when accuracies exist (None if the old accuracy is 0), else exp(old loss - new loss)."""
    if old.get("accuracy") is not None and new.get("accuracy") is not None:
        return None if old["accuracy"] == 0 else new["accuracy"] / old["accuracy"]
    return math.exp(old["loss"] - new["loss"])


def evaluate_adapters(base_model, tokenizer, adapters: dict[str, Path], dataset: Dataset, max_length: int,
                      batch_size: int = 16, base_label: str = "base", progress: bool = True) -> dict[str, dict]:
    """{name: evaluate() result} for each adapter loaded in turn on ``base_model`` (which is left as it was;
    the key None evaluates the base without an adapter)."""
    from peft import PeftModel

    results = {}
    for name, path in adapters.items():
        if path is None:
            results[name] = evaluate(base_model, tokenizer, dataset, max_length, batch_size,
                                     desc=f"{name} on {base_label}", progress=progress)
            continue
        model = PeftModel.from_pretrained(base_model, str(path), is_trainable=False)
        try:
            results[name] = evaluate(model, tokenizer, dataset, max_length, batch_size,
                                     desc=f"{name} on {base_label}", progress=progress)
        finally:
            base_model = model.unload()  # removes the injected LoRA layers, weights untouched
    return results


