"""What we compare against: vanilla PEFT with the Trans-PEFT reference code's masking.

The reference code masks with ``h * (torch.rand_like(h) > p).float()``: a float32 mask tensor per
layer that autograd keeps for backward. On a bf16 base the product is cast back to h's dtype so the
down projection accepts it (the cast saves nothing). Shared by tests, the README figure and benchmarks.
"""
from __future__ import annotations

import torch
from torch import nn

from .memory import saved_activation_bytes


def vanilla_masked_mlp(mlp: nn.Module, x: torch.Tensor, p: float) -> torch.Tensor:
    """A split-layout gated MLP (gate_proj/up_proj/down_proj/act_fn, PEFT layers or not) with the
    reference code's float mask."""
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    h = (h * (torch.rand_like(h) > p).float()).to(h.dtype)
    return mlp.down_proj(h)


def mlp_saved_bytes_vs_vanilla(d: int, inter: int, tokens: int, dtype: torch.dtype, rank: int = 16,
                               lora_dropout: float = 0.05, masking: float = 0.1, backend: str = "torch") -> tuple[int, int]:
    """(vanilla, patched) bytes saved for backward by one Llama MLP with PEFT LoRA on gate/up/down
    (adapters in PEFT's default dtype), ``tokens`` tokens, in training mode. Needs peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from .integration import patch

    config = LlamaConfig(hidden_size=d, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, vocab_size=8)
    model = get_peft_model(LlamaForCausalLM(config).to(dtype), LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=lora_dropout, target_modules=["gate_proj", "up_proj", "down_proj"]))
    model.train()
    mlp = model.get_base_model().model.layers[0].mlp
    params = list(model.parameters())
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    vanilla = saved_activation_bytes(lambda: vanilla_masked_mlp(mlp, x, masking), exclude=params)
    patch(model, masking=masking, dropping=0.0, backend=backend)
    ours = saved_activation_bytes(lambda: mlp(x), exclude=params)
    return vanilla, ours
