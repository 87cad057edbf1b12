// The golden test on CUDA (tests/unit/model/golden_device_test.cpp) against the emulated
// device of cuda_backend_emu.cpp.
#define LLAMA3_CUDA_EMU 1
#include "tests/unit/model/golden_device_test.cpp"
