#include "runtime/core/allocator.h"

#include <bit>
#include <cstdlib>
#include <new>

#include "runtime/core/error.h"

namespace llama3 {

CachingAllocator::~CachingAllocator() { empty_cache(); }

size_t CachingAllocator::size_class(size_t bytes) {
  if (bytes <= 512) return 512;
  size_t p = std::bit_floor(bytes);
  size_t step = p / 8;
  return (bytes + step - 1) / step * step;
}

void* CachingAllocator::allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  size_t cls = size_class(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = free_.find(cls);
  void* p = nullptr;
  if (it != free_.end() && !it->second.empty()) {
    p = it->second.back();
    it->second.pop_back();
  } else {
    p = raw_alloc_(cls);
    if (!p) {
      // Give cached blocks back and retry once before reporting.
      for (auto& [c, v] : free_)
        for (void* q : v) raw_free_(q), stats_.reserved -= c;
      free_.clear();
      p = raw_alloc_(cls);
      if (!p)
        throw std::bad_alloc();
    }
    stats_.reserved += cls;
    stats_.n_system_allocs++;
  }
  stats_.in_use += cls;
  if (stats_.in_use > stats_.peak_in_use) stats_.peak_in_use = stats_.in_use;
  return p;
}

void CachingAllocator::deallocate(void* p, size_t bytes) {
  if (!p) return;
  size_t cls = size_class(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  free_[cls].push_back(p);
  stats_.in_use -= cls;
}

AllocatorStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void CachingAllocator::reset_peak() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.peak_in_use = stats_.in_use;
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [c, v] : free_)
    for (void* q : v) raw_free_(q), stats_.reserved -= c;
  free_.clear();
}

namespace {
void* cpu_raw_alloc(size_t n) { return std::aligned_alloc(64, (n + 63) / 64 * 64); }
void cpu_raw_free(void* p) { std::free(p); }
}  // namespace

Allocator& cpu_allocator() {
  static CachingAllocator* a = new CachingAllocator(cpu_raw_alloc, cpu_raw_free);  // never destroyed: tensors may outlive statics
  return *a;
}

}  // namespace llama3
