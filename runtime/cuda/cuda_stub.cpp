// cuda_init() for builds without the CUDA backend (LLAMA3_CUDA=OFF): there is never a device.
#ifndef LLAMA3_WITH_CUDA
#include "runtime/cuda/cuda_backend.h"

namespace llama3 {
bool cuda_init() { return false; }
int cuda_device_count() { return 0; }
}  // namespace llama3
#endif
