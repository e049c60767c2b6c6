"""The PyTorch reference: the math every backend must reproduce. Differentiable by autograd."""
from .activations import Activation, act, act_grad, activation_from_config_name
from .lora import dropout_multiplier, lora_dropout, lora_linear
from .mlp import gate_and_up, gated_mlp, knowledge_mask
from .philox import keep_mask, keep_threshold, philox_randint, philox_randint4x, philox_uniform

__all__ = [
    "Activation", "act", "act_grad", "activation_from_config_name",
    "dropout_multiplier", "lora_dropout", "lora_linear",
    "gate_and_up", "gated_mlp", "knowledge_mask",
    "keep_mask", "keep_threshold", "philox_randint", "philox_randint4x", "philox_uniform",
]
