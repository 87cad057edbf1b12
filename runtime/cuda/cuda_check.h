// Error checks for CUDA runtime and cuBLAS(Lt) calls: failures throw llama3::Error naming
// the call, the error and the source line.
#pragma once

#ifdef LLAMA3_CUDA_EMU
#include "runtime/cuda/emu/host_emu.h"  // the emulated device (tests/unit/cuda_emu)
#else
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#endif

#include "runtime/core/error.h"

#define LLAMA3_CUDA_CHECK(expr)                                                                \
  do {                                                                                         \
    const cudaError_t _e = (expr);                                                             \
    if (_e != cudaSuccess) [[unlikely]]                                                        \
      throw ::llama3::Error(::fmt::format("CUDA error {} ({}: {}) in {} ({}:{})", int(_e),     \
                                          cudaGetErrorName(_e), cudaGetErrorString(_e), #expr, \
                                          __FILE__, __LINE__));                                \
  } while (0)

#define LLAMA3_CUBLAS_CHECK(expr)                                                        \
  do {                                                                                   \
    const cublasStatus_t _s = (expr);                                                    \
    if (_s != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                        \
      throw ::llama3::Error(::fmt::format("cuBLAS error {} ({}) in {} ({}:{})", int(_s), \
                                          cublasLtGetStatusString(_s), #expr, __FILE__,  \
                                          __LINE__));                                    \
  } while (0)
