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


ACCELERATOR = torch.device("cuda") if torch.cuda.is_available() else None


@pytest.fixture
def on_accelerator():
    """Op tests create tensors with factory defaults; on a GPU machine those land on the GPU, so the
    compiled kernels run instead of falling back (without one, Triton runs in the interpreter)."""
    if ACCELERATOR is None:
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device(ACCELERATOR)
    try:
        yield
    finally:
        torch.set_default_device(previous)


NEW_FP32_PRECISION_API = hasattr(torch.backends, "fp32_precision")  # torch >= 2.9


@pytest.fixture
def fp32_matmul():
    """A setter of torch's fp32 matmul precision ("highest": full fp32, "high": TF32 allowed) for the
    test, through the older API (the newer one reflects it); everything either API holds is restored
    afterwards (a mixed state would make every later cuBLAS call in the process raise)."""
    from transpeft_kernels.kernels.env import restore_fp32_precision, save_fp32_precision

    saved = save_fp32_precision()
    yield torch.set_float32_matmul_precision
    restore_fp32_precision(saved)
