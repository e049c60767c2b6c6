// TRANSPEFT_HD: functions that compile for the device under nvcc and as plain inline host code under
// g++, so the same math runs in the kernels and in the host tests.
#pragma once

#if defined(__CUDACC__)
#define TRANSPEFT_HD __host__ __device__ __forceinline__
#else
#define TRANSPEFT_HD inline
#endif
