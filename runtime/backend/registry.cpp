#include <array>
#include <mutex>

#include "runtime/backend/backend.h"
#include "runtime/cpu/cpu_backend.h"

namespace llama3 {

namespace {
constexpr int kMaxCuda = 16;
std::array<Backend*, kMaxCuda> g_cuda{};
std::mutex g_mu;
}  // namespace

Backend& backend_for(Device d) {
  if (d.is_cpu()) return cpu_backend();
  LLAMA3_CHECK(d.index >= 0 && d.index < kMaxCuda && g_cuda[d.index],
               "no backend for device {} (this build has: cpu{})", d.str(),
               g_cuda[0] ? ", cuda" : "");
  return *g_cuda[d.index];
}

void register_backend(Backend* b) {
  std::lock_guard<std::mutex> lock(g_mu);
  Device d = b->device();
  LLAMA3_CHECK(!d.is_cpu() && d.index < kMaxCuda, "cannot register a backend for {}", d.str());
  g_cuda[d.index] = b;
}

bool has_backend(Device d) { return d.is_cpu() || (d.index < kMaxCuda && g_cuda[d.index]); }

}  // namespace llama3
