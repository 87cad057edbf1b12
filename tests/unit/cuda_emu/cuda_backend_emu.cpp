// runtime/cuda/cuda_backend.cpp compiled for the SIMT emulator: cuda_init() here registers
// an emulated cuda:0 whose kernels are the emulated ones (*_emu.cpp) and whose GEMMs are
// runtime/cuda/emu/host_emu.h's reference loop.
#define LLAMA3_CUDA_EMU 1
#include "runtime/cuda/cuda_backend.cpp"
