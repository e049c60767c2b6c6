"""Tiny random HuggingFace causal-LM models for tests.

Builds small, randomly initialised ``AutoModelForCausalLM`` models from configs
only (nothing is downloaded). Every model has 2 decoder layers, hidden size 32,
intermediate size 48 (deliberately not a power of two), 4 attention heads of
head_dim 8, 2 kv heads where supported, vocab 128 and 64 positions. Attention is
"eager" and every dropout is 0, so forward passes are deterministic in both
train and eval mode.

``FAMILIES`` lists the gated-MLP model types (``mlp.gate_proj/up_proj/down_proj``
or fused ``mlp.gate_up_proj/down_proj``). Activations are each family's default
(silu; gelu_pytorch_tanh for the gemmas) except glm4, set to erf ``gelu`` so all
three activations are covered. Two extra model types are also supported:
``gpt2`` (no gated MLP: ``mlp.c_fc/c_proj``) and ``qwen3_moe`` (layer 0 dense
MLP, layer 1 sparse MoE block).

Usage::

    model = tiny_model("llama", seed=0)
    cfg = tiny_config("gemma2", num_hidden_layers=3)
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "granite",
    "smollm3",
    "cohere",
    "phi3",
    "glm",
    "glm4",
)

# Shared by every model type. Token ids are pinned because several families
# default to ids far beyond the tiny vocab (e.g. glm pad_token_id=151329).
_COMMON = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Shared by the llama-style configs (everything except gpt2).
_DECODER = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    attention_dropout=0.0,
)

_GEMMA_SLIDING = dict(
    query_pre_attn_scalar=8,  # = head_dim
    sliding_window=4,  # smaller than test sequences, so the window is exercised
    layer_types=["sliding_attention", "full_attention"],
)

# Per-model-type overrides on top of _COMMON (+ _DECODER unless noted).
_OVERRIDES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},  # hidden_act defaults to gelu_pytorch_tanh
    "gemma2": dict(_GEMMA_SLIDING),  # hidden_activation gelu_pytorch_tanh; softcaps 50/30 kept
    "gemma3_text": dict(_GEMMA_SLIDING),  # hidden_activation gelu_pytorch_tanh
    "olmo2": {},
    "granite": {},
    "smollm3": {},
    "cohere": dict(use_qk_norm=False),
    "phi3": dict(resid_pdrop=0.0, embd_pdrop=0.0),
    "glm": {},
    "glm4": dict(hidden_act="gelu"),  # erf gelu; no family defaults to it
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=[0],  # layer 0 dense MLP, layer 1 sparse MoE
    ),
}

# gpt2 uses its own key names and does not get _DECODER.
_GPT2 = dict(
    n_embd=32,
    n_inner=48,
    n_layer=2,
    n_head=4,
    n_positions=64,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    summary_first_dropout=0.0,
)


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """Config for a tiny ``model_type`` model; ``overrides`` win over defaults."""
    if model_type == "gpt2":
        kwargs = {**_COMMON, **_GPT2}
    elif model_type in _OVERRIDES:
        kwargs = {**_COMMON, **_DECODER, **_OVERRIDES[model_type]}
    else:
        raise ValueError(f"unsupported model_type {model_type!r}")
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    return config


def tiny_model(
    model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> PreTrainedModel:
    """Randomly initialised tiny causal LM (left in whatever mode HF builds it)."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
