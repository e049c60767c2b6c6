"""The cases the performance model describes, and how each implementation runs one of them on the
meta device (forward and backward, nothing computed) so that perf/ledger.py can record it.

Ops: ``lora_linear`` (one PEFT LoRA Linear d -> n), ``gated_mlp`` (a Llama MLP with LoRA on gate, up
and down and the knowledge mask), ``train_step`` (one Llama decoder layer, LoRA on all seven
projections, the knowledge mask on its MLP; forward and backward of a training step, no optimizer).
Implementations:
    vanilla   PEFT's modules (fp32 or bf16 adapters, nn.Dropout copies) and the Trans-PEFT reference
              code's float mask ``h * (rand_like(h) > p).float()``
    floor     the frozen base only: no LoRA, no mask; backward to the input only (dx), the lower bound
    torch, triton, cuda   the op on that backend (train_step: the layer patched with that backend)
Attention (train_step) is modelled as FlashAttention-2 launches for every implementation alike.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..specs import SEED_BOUND, stream_offsets

IMPLS = ("vanilla", "floor", "torch", "triton", "cuda")
OPS = ("lora_linear", "gated_mlp", "train_step")


@dataclass(frozen=True)
class ModelCase:
    """One shape and setting. M tokens; d model width; n out-features (lora_linear); I intermediate
    width; heads/kv_heads/seq for train_step (M = batch * seq)."""

    op: str
    M: int
    d: int
    n: int | None
    I: int | None  # noqa: E741 - the package's letter for the intermediate width
    r: int
    masking: float
    lora_dropout: float
    dtype: str = "bfloat16"
    adapter_dtype: str = "float32"  # PEFT's default on a bf16 base
    heads: int = 32
    kv_heads: int = 8
    seq: int = 2048

    @property
    def label(self) -> str:
        shape = f"n={self.n}" if self.op == "lora_linear" else f"I={self.I}"
        return (f"{self.op} M={self.M} d={self.d} {shape} r={self.r} mask={self.masking} q={self.lora_dropout} "
                f"adapters={self.adapter_dtype}")

    def fields(self) -> dict:
        return asdict(self)


def default_cases() -> list[ModelCase]:
    """Llama-3-8B shapes (d 4096, I 14336, 32 heads / 8 KV heads), 8192 tokens, bf16 base: r 16 and
    64, lora_dropout 0 and 0.05, PEFT's fp32 adapters and bf16 adapters; masking 0.1 for the MLP."""
    out = []
    for adapters in ("float32", "bfloat16"):
        for r in (16, 64):
            for q in (0.0, 0.05):
                out.append(ModelCase("lora_linear", 8192, 4096, 4096, None, r, 0.0, q, adapter_dtype=adapters))
                out.append(ModelCase("gated_mlp", 8192, 4096, None, 14336, r, 0.1, q, adapter_dtype=adapters))
        out.append(ModelCase("train_step", 8192, 4096, None, 14336, 16, 0.1, 0.05, adapter_dtype=adapters))
    return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _seed() -> torch.Tensor:
    # drawn on the device the op runs on (here the meta stand-in for the GPU), as the patched MLP does
    return torch.randint(SEED_BOUND, (), dtype=torch.int64, device="meta")


# ---- lora_linear and gated_mlp -------------------------------------------------------------------
def _op_setup(case: ModelCase):
    from ..bench.cases import OpCase
    from ..bench.impls import build_setup

    op = OpCase(case.op, "model", case.op, case.M, case.d, case.n, case.I, case.r, case.lora_dropout, case.masking,
                dtype=case.dtype)
    setup = build_setup(op, torch.device("meta"))
    adt = _dtype(case.adapter_dtype)
    for p in setup.params:
        p.data = p.data.to(adt)
    return setup


def _prepare_op(case: ModelCase, impl: str):
    from .. import ops
    from ..baselines import vanilla_masked_mlp
    from ..ops.backends import by_name

    setup = _op_setup(case)
    dt = _dtype(case.dtype)
    x = torch.empty(case.M, case.d, dtype=dt, device="meta", requires_grad=impl != "floor")
    if impl == "floor":
        w = setup.weights
        if case.op == "lora_linear":
            def floor_linear():
                y = F.linear(x, w.weight, w.bias)
                torch.empty_like(y) @ w.weight
            return floor_linear
        wg, wu, wd = (p.weight for p in w.projections)

        def floor_mlp():
            g, _u = F.linear(x, wg), F.linear(x, wu)
            y = F.linear(g, wd)  # g stands in for h (same shape, same GEMM)
            dh = torch.empty_like(y) @ wd
            (dh @ wg).addmm_(dh, wu)
        return floor_mlp
    if impl == "vanilla":
        fwd = setup.module if case.op == "lora_linear" else (lambda t: vanilla_masked_mlp(setup.module, t, case.masking))
    else:
        backend = by_name(impl)
        random = setup.case.random  # a seed only where something is random, as the benchmark draws it
        if case.op == "lora_linear":
            def fwd(t):
                return ops.lora_linear(t, setup.weights, _seed() if random else None, backend)
        else:
            def fwd(t):
                return ops.masked_gated_mlp(t, setup.weights, setup.activation, setup.mask, _seed() if random else None,
                                            backend)
    def step():
        y = fwd(x)
        torch.autograd.grad(y, [x, *setup.params], torch.empty_like(y))
    return step


# ---- train_step: one decoder layer ---------------------------------------------------------------
def _layer_model(case: ModelCase, lora: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=case.d, intermediate_size=case.I, num_hidden_layers=1,
                         num_attention_heads=case.heads, num_key_value_heads=case.kv_heads, vocab_size=16,
                         max_position_embeddings=case.seq, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(_dtype(case.dtype))
    if not lora:
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.lora_dropout,
                                             target_modules="all-linear", exclude_modules=["lm_head"]))
    adt = _dtype(case.adapter_dtype)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(adt)
    model.train()
    return model


def _prepare_train_step(case: ModelCase, impl: str):
    from ..baselines import vanilla_masked_mlp

    model = _layer_model(case, lora=impl != "floor")
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = hf.model.layers[0]
    if impl == "vanilla":
        mlp = layer.mlp
        mlp.forward = lambda t: vanilla_masked_mlp(mlp, t, case.masking)
    elif impl != "floor":
        from ..integration import patch

        patch(model, masking=case.masking, dropping=0.0, backend=impl)
    batch = case.M // case.seq
    hidden = torch.empty(batch, case.seq, case.d, dtype=_dtype(case.dtype), device="meta", requires_grad=True)
    positions = torch.arange(case.seq, device="meta").unsqueeze(0).expand(batch, -1)
    head_dim = case.d // case.heads  # the rotary tables are made once per model step, not per layer
    cos_sin = tuple(torch.empty(batch, case.seq, head_dim, dtype=hidden.dtype, device="meta") for _ in range(2))
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        out = layer(hidden, position_embeddings=cos_sin, attention_mask=None, position_ids=positions)
        y = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(y, [hidden, *params], torch.empty_like(y))
    return step


def prepare(case: ModelCase, impl: str):
    """Build ``impl`` for ``case`` on meta tensors; returns ``step()``, its forward and backward
    (to run inside perf.ledger.recording, so that only the step lands in the ledger)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    # what a step makes once per device and then reuses, made here: otherwise the first case recorded in a
    # process would carry one more launch than the same case recorded later
    stream_offsets(torch.device("meta"))
    if case.op == "train_step":
        return _prepare_train_step(case, impl)
    if case.op in ("lora_linear", "gated_mlp"):
        return _prepare_op(case, impl)
    raise ValueError(f"op: expected one of {OPS}, got {case.op!r}")
