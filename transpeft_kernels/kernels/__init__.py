"""Kernel layer: compiled kernels and their launchers. Imports triton/torch only; never torch.nn,
transformers or PEFT. The ops layer (``transpeft_kernels.ops``) composes these into autograd ops."""
