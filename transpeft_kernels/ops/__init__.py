"""Autograd functions and backend choice. Imports the reference; never torch.nn modules or transformers."""
from .backends import BACKEND_NAMES, check_available, resolve, runnable_backends, validate_backend_name
from .functions import lora_linear, masked_gated_act, masked_gated_mlp

__all__ = [
    "BACKEND_NAMES", "check_available", "resolve", "runnable_backends", "validate_backend_name",
    "lora_linear", "masked_gated_act", "masked_gated_mlp",
]
