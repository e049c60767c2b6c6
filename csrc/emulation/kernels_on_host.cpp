// The CUDA backend's kernels, unchanged, compiled by g++ for the CPU: the emulation library
// (libtranspeft_cuda_emulation.so, TRANSPEFT_CUDA_EMULATE=1) and the host test test_fused_host.
// Built with -I csrc/emulation/simt first, so `#include <cuda_runtime.h>` finds the host stand-in
// there, which runs each launch with one fiber per CUDA thread (real barriers and shuffles). Pointers
// are host pointers, streams are ignored, and error codes are cudaError_t values.
#include "../kernels/masked_gated_act.cu"
#include "../kernels/act_lora.cu"
#include "../kernels/lora.cu"
#include "../kernels/lora_expand.cu"
#include "../kernels/lora_shrink.cu"
#include "../kernels/lora_reduce.cu"
#include "../kernels/runtime.cu"
