// Library identity, error names and the argument structs' layout for the binding
// (transpeft_kernels/kernels/cuda/library.py).
#include <cuda_runtime.h>

#include "transpeft/capi.h"
#include "transpeft/capi_layout.h"

extern "C" int transpeft_cuda_abi_version(void) { return TRANSPEFT_CUDA_ABI_VERSION; }

extern "C" int64_t transpeft_cuda_struct_size(const char* name) {
  return transpeft::abi::layout_value(name, nullptr);
}

extern "C" int64_t transpeft_cuda_field_offset(const char* name, const char* field) {
  return field == nullptr ? -1 : transpeft::abi::layout_value(name, field);
}

// cudaGetErrorString needs no device or driver, so a CPU-only machine still gets a readable message.
extern "C" const char* transpeft_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
