// The CUDA backend: one Backend per visible device (cuBLASLt GEMMs, an own flash-attention
// kernel, fused RMSNorm/RoPE/SwiGLU/cross-entropy/AdamW kernels), registered for
// Device::cuda(i) by cuda_init(). Kernels run on one stream per backend; device memory comes
// from a caching allocator over cudaMalloc (no managed memory).
//
// Supported dtypes on CUDA: f32 and bf16 for floating kernels (f32 accumulation everywhere),
// i32 token/document ids, and any of f32/bf16/f16/i32/i64/u8 for copy/fill. f64 is CPU-only
// (finite-difference checks) and raises an error listing what is supported.
#pragma once

#include <string>

namespace llama3 {
#ifdef LLAMA3_CUDA_EMU
// cuda_backend.cpp compiled for the SIMT emulator (tests/unit/cuda_emu) registers an
// emulated device through its own copies of these functions.
inline namespace emulated {
#endif

// Registers a CUDA backend for every visible device; idempotent. Returns false, without
// throwing, when the build has no CUDA or no device/driver is usable (any CUDA error from
// device discovery counts as "no device").
bool cuda_init();

// Number of CUDA backends cuda_init() registered (0 without a device).
int cuda_device_count();

// Per-op GPU time of device `index` (benchmarks): after cuda_profile_start every outermost
// backend call is bracketed by CUDA events; cuda_profile_report stops recording and returns
// a table of the summed times by op (GEMMs by shape), largest first. Throws without that
// device.
void cuda_profile_start(int index);
std::string cuda_profile_report(int index);

// The stream every kernel of device `index` runs on (a cudaStream_t), for libraries that must
// order their own streams with it (the NCCL communicator). Throws without that device.
void* cuda_stream(int index);

// The dense peak FLOP/s of an NVIDIA GPU from its name and compute capability (major), as the
// vendor publishes it: bf16 on tensor cores with f32 accumulation (bf16), else f32 FMA; 0 for
// a card not in the table (H100 SXM/PCIe/NVL, H200, GH200, A100). The denominator of MFU in
// `llama3 train --device cuda`'s progress line (the benchmarks use 989 TFLOP/s, the H100 SXM's
// and H200's).
double nvidia_peak_flops(const std::string& name, int major, bool bf16);
// The same for device `index`; 0 without that device or for a card not in the table.
double cuda_peak_flops(int index, bool bf16);

#ifdef LLAMA3_CUDA_EMU
}  // namespace emulated
#endif
}  // namespace llama3
