// The CPU-vs-CUDA parity suite (tests/unit/backend_parity) against the emulated device of
// cuda_backend_emu.cpp: every case, including the whole model step in f32 and bf16 mixed
// precision, runs the CUDA backend's host code and kernels on the CPU.
#define LLAMA3_CUDA_EMU 1
#include "tests/unit/backend_parity/backend_parity_test.cpp"
