// runtime/cuda/attention_mma.cu compiled as C++ against the SIMT emulator (runtime/cuda/emu).
#define LLAMA3_CUDA_EMU 1
#include "runtime/cuda/attention_mma.cu"
