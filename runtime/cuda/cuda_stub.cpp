// cuda_init() for builds without the CUDA backend (LLAMA3_CUDA=OFF): there is never a device.
#ifndef LLAMA3_WITH_CUDA
#include "runtime/core/error.h"
#include "runtime/cuda/cuda_backend.h"

namespace llama3 {
bool cuda_init() {
  return false;
}
int cuda_device_count() {
  return 0;
}
void cuda_profile_start(int index) {
  fail("cuda_profile_start: no CUDA in this build (device {})", index);
}
std::string cuda_profile_report(int index) {
  fail("cuda_profile_report: no CUDA in this build (device {})", index);
}
void* cuda_stream(int index) {
  fail("cuda_stream: no CUDA in this build (device {})", index);
}
double nvidia_peak_flops(const std::string&, int, bool) {
  return 0;
}
double cuda_peak_flops(int, bool) {
  return 0;
}
}  // namespace llama3
#endif
