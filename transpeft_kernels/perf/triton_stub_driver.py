"""Triton's CUDA driver with no GPU below it: kernels compile for a real target, launches are recorded.

With ``stub_cuda_driver()`` active (and TRITON_INTERPRET unset, so that kernels are real JITFunctions),
``kernel[grid](...)`` runs Triton's whole host path, argument binding, specialisation, cache lookup,
compilation for ``sm_<arch>`` with ptxas, up to the compiled kernel's launcher, which here records
its arguments instead of calling the driver. Tensors may live on the CPU: only their addresses are read.

Two uses: timing the host path of a launch as on a GPU machine (``benchmarks/host_overhead.py``), and
checking that ``kernels/triton/direct_launch.py`` hands the launcher exactly what Triton's own path
would (``python_tests/test_triton_direct_launch.py``).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import torch

# H200-like properties; only max_shared_mem is read by Triton's host path.
_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
               "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}


@dataclass
class Launch:
    """One recorded launcher call: what Triton passes to a compiled kernel's launcher."""

    grid: tuple
    stream: int
    function: int
    packed_metadata: object
    launch_metadata: object
    hooks: tuple
    args: tuple


@dataclass
class StubState:
    launches: list[Launch] = field(default_factory=list)
    record: bool = True


def _handle(name: str, binary: bytes) -> int:
    """A stand-in function handle, distinct per compiled kernel."""
    return int.from_bytes(hashlib.blake2b(name.encode() + binary, digest_size=6).digest(), "little")


@contextlib.contextmanager
def stub_cuda_driver(arch: int = 90, device: int = 0, stream: int = 7):
    """Make a stub of Triton's CUDA driver the active driver inside the block; yields its StubState."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.driver import driver

    state = StubState()

    class Utils:
        def load_binary(self, name, kernel, shared, dev):
            h = _handle(name, bytes(kernel))
            return h, h, 32, 0, 1024  # module, function, registers, spills, max threads per block

        def get_device_properties(self, dev):
            return dict(_PROPERTIES)

    class Launcher:
        def __init__(self, src, metadata):
            pass

        def __call__(self, gx, gy, gz, strm, function, packed_metadata, launch_metadata, enter, exit_, *args):
            if state.record:
                state.launches.append(Launch((gx, gy, gz), strm, function, packed_metadata, launch_metadata,
                                             (enter, exit_), args))

    class StubCudaDriver(CudaDriver):
        def __init__(self):  # CudaDriver's own __init__ loads libcuda
            self.utils = Utils()
            self.launcher_cls = Launcher
            self.get_current_device = lambda: device
            self.get_current_stream = lambda dev=None: stream

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    previous = driver._active  # reset_active() would create the real driver, which needs a GPU
    driver.set_active(StubCudaDriver())
    try:
        yield state
    finally:
        driver._active = previous
