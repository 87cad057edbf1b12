// The Trainer's captured-step test (tests/unit/backend_parity/cuda_graph_test.cpp) on the
// emulated device of cuda_backend_emu.cpp.
#define LLAMA3_CUDA_EMU 1
#include "tests/unit/backend_parity/cuda_graph_test.cpp"
