import os
import sys
import warnings

# Without a GPU, Triton kernels run in the interpreter. It must be chosen before triton is imported.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch
        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="peft")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def tolerances(dtype: torch.dtype) -> dict:
    """Tolerances for a computed-in-dtype result against the reference in the same dtype."""
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
        torch.float16: dict(atol=5e-3, rtol=5e-3),
    }[dtype]
