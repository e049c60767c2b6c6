// Library identity and error names for the binding (transpeft_kernels/kernels/cuda/library.py).
#include <cuda_runtime.h>

#include "transpeft/capi.h"

extern "C" int transpeft_cuda_abi_version(void) { return TRANSPEFT_CUDA_ABI_VERSION; }

// cudaGetErrorString needs no device or driver, so a CPU-only machine still gets a readable message.
extern "C" const char* transpeft_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
