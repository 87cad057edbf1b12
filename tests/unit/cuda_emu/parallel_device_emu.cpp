// The ParallelLlama cases on CUDA tensors (tests/unit/model/parallel_device_test.cpp) against
// the emulated cuda:0 of cuda_backend_emu.cpp: the world-of-one parallel step (over the
// single-rank communicator: NCCL cannot drive an emulated device) against the plain model on
// the same device and on the CPU, and the vocabulary-parallel embedding and cross-entropy.
#define LLAMA3_CUDA_EMU 1
#undef LLAMA3_WITH_NCCL
#include "tests/unit/model/parallel_device_test.cpp"
