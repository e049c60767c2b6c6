"""Triton kernels of transpeft_kernels (one module per kernel family) and their launchers.

    masked_gated_act   h' = act(g) * u * keep * c, and (dg, du)          masked_gated_act.py
    lora_shrink        S = dropout_q(x) A^T   (also t = dY B)              lora_shrink.py
    gemm_lora_expand   Y = X W^T + b + s * D(S B^T)   (forward and dX)     gemm_lora_expand.py
    token_reduce       scale * P^T D(Q) (+ colsum P)   (dW, db, dA, dB)    token_reduce.py
    gate_up_act        gate/up GEMM with the masked activation epilogue    gate_up_act.py
    act_bwd_lora       the activation backward in one pass over (M, I),    act_bwd_lora.py
                       with the LoRA partials dB (gate/up), dA (down), t optional
    lora_expand_add    y += s D(S B^T) in place over a cuBLAS output       lora_epilogue.py
    lora_expand_into   C = b + LoRA terms, for a cuBLAS addmm_ into C      lora_epilogue.py
    gate_up_lora_act   g, u += LoRA expands in place, and h'               lora_epilogue.py

Import this package only after choosing TRITON_INTERPRET (it is read when the kernels are defined).
"""
from .act_bwd_lora import MAX_RANK as ACT_BWD_LORA_MAX_RANK, ActBwdLoraGrads, DownLora, LoraSide, act_bwd_lora, fold_supported as act_bwd_fold_supported
from .gate_up_act import GateUpOperand, gate_up_act
from .gemm_lora_expand import gemm_lora_expand
from .lora_epilogue import ExpandSide, LoraTerm, gate_up_lora_act, lora_expand_add, lora_expand_into
from .lora_shrink import lora_shrink
from .masked_gated_act import masked_gated_act_bwd, masked_gated_act_fwd
from .token_reduce import token_reduce

__all__ = ["ACT_BWD_LORA_MAX_RANK", "act_bwd_fold_supported", "ActBwdLoraGrads", "DownLora", "LoraSide", "act_bwd_lora", "GateUpOperand", "gate_up_act", "ExpandSide", "gate_up_lora_act", "lora_expand_add", "LoraTerm", "lora_expand_into", "gemm_lora_expand", "lora_shrink", "masked_gated_act_bwd", "masked_gated_act_fwd", "token_reduce"]
