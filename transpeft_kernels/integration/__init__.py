"""Model integration: finds gated FFNs in transformers / PEFT models and installs the patched forward."""
from .families import FAMILIES, Family, register_family
from .patch import is_patched, patch, patch_settings, unpatch
from .report import PatchReport

__all__ = ["FAMILIES", "Family", "register_family", "is_patched", "patch", "patch_settings", "unpatch", "PatchReport"]
