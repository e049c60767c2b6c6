"""CUDA C++ kernels (csrc/kernels) through ctypes. Imports torch only; never torch.nn or transformers.

    masked_gated_act_fwd   h' = act(g) * u * keep * c,  optionally S_d = dropout(h') A_d^T fused (tensor cores
                           when I % 8 == 0 and rows are 16-byte aligned), and there optionally the gate/up
                           LoRA expands added to g and u in place first (GateUpLora)
    masked_gated_act_bwd   dg, du with dh' = dh_base + s * D(t_d A_d) fused; optionally h', dropout(h')
    act_bwd_lora           the same dg, du and dA_d = s t_d^T dropout(h') in one pass, LoRA products on tensor cores;
                           optionally the gate/up dB = s cast(dg)^T S_g (and du, S_u) from the same tiles
    lora_shrink            S = dropout_q(cast_A(x)) A^T   (also t = dY B)
    lora_expand_           y += s * S B^T in place on a fresh GEMM output (forward and dX)
    lora_dropout_cast      dropout_q(cast_A(x))           (the LoRA input for dA, ranks above 64)
    lora_token_reduce      s l^T dropout_q(cast_A(x))     (dB^T = s S^T dY, dA = s t^T D(x); tensor cores, no cast copy)

The library is found or built as library.py describes; the big GEMMs are not here (the backend
runs them through ATen, i.e. cuBLAS).
"""
from .launch import (GATE_UP_RANK_STEP, MAX_DB_RANK, MAX_FUSED_RANK, MAX_GATE_UP_RANK, MAX_REDUCE_RANK, Dropout, GateUpLora,
                     act_bwd_lora, act_bwd_lora_supported, gate_up_supported,
                     lora_dropout_cast, lora_token_reduce, lora_expand_, lora_shrink, masked_gated_act_bwd,
                     masked_gated_act_fwd)
from .library import BUILD_ROUTES, emulating, find_library, load

__all__ = ["BUILD_ROUTES", "GATE_UP_RANK_STEP", "MAX_DB_RANK", "MAX_FUSED_RANK", "MAX_GATE_UP_RANK", "MAX_REDUCE_RANK", "Dropout", "GateUpLora",
           "act_bwd_lora", "act_bwd_lora_supported", "gate_up_supported",
           "emulating", "lora_token_reduce", "find_library", "load", "lora_dropout_cast",
           "lora_expand_", "lora_shrink", "masked_gated_act_bwd", "masked_gated_act_fwd"]
