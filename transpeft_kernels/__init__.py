"""transpeft_kernels: Trans-PEFT (knowledge masking + cross-layer knowledge dropping) for LoRA training
of transformers models, with fused kernels behind a PyTorch reference.

    import transpeft_kernels as tpk
    report = tpk.patch(model, masking=0.1, dropping=0.1)   # model: transformers or PEFT model
    print(report); ...train...; tpk.unpatch(model)
"""
from .integration import FAMILIES, Family, PatchReport, is_patched, patch, register_family, unpatch
from .specs import Layout

__version__ = "0.1.0"

__all__ = ["FAMILIES", "Family", "Layout", "PatchReport", "is_patched", "patch", "register_family", "unpatch", "__version__"]
