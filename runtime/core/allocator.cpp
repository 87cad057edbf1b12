#include "runtime/core/allocator.h"

#include <bit>
#include <cstdlib>
#include <new>

#include "runtime/core/error.h"

namespace llama3 {

CachingAllocator::~CachingAllocator() {
  for (auto& [id, f] : pools_)
    for (auto& [c, v] : f)
      for (void* q : v) raw_free_(q);
  empty_cache();
}

void* CachingAllocator::take(FreeLists& f, size_t cls) {
  auto it = f.find(cls);
  if (it == f.end() || it->second.empty()) return nullptr;
  void* p = it->second.back();
  it->second.pop_back();
  return p;
}

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
  void* p = active_ ? take(pools_[active_], cls) : nullptr;
  if (!p) p = take(free_, cls);
  if (!p) {
    p = raw_alloc_(cls);
    // Give cached blocks back and retry once before reporting (not while a pool is being
    // captured: freeing device memory synchronises, which a capture forbids).
    if (!p && !active_) {
      for (auto& [c, v] : free_)
        for (void* q : v) raw_free_(q), stats_.reserved -= c;
      free_.clear();
      p = raw_alloc_(cls);
    }
    if (!p) throw std::bad_alloc();
    stats_.reserved += cls;
    stats_.n_system_allocs++;
  }
  if (active_) pool_of_[p] = active_;
  stats_.in_use += cls;
  if (stats_.in_use > stats_.peak_in_use) stats_.peak_in_use = stats_.in_use;
  return p;
}

void CachingAllocator::deallocate(void* p, size_t bytes) {
  if (!p) return;
  size_t cls = size_class(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  stats_.in_use -= cls;
  auto it = pool_of_.find(p);
  if (it != pool_of_.end()) {
    auto pool = pools_.find(it->second);
    if (pool != pools_.end()) {
      pool->second[cls].push_back(p);
      return;
    }
    pool_of_.erase(it);  // its pool was released
  }
  free_[cls].push_back(p);
}

int CachingAllocator::begin_pool() {
  std::lock_guard<std::mutex> lock(mu_);
  LLAMA3_CHECK(active_ == 0, "allocator: private pool {} is still open (captures do not nest)", active_);
  active_ = next_pool_++;
  pools_[active_];
  return active_;
}

void CachingAllocator::end_pool() {
  std::lock_guard<std::mutex> lock(mu_);
  active_ = 0;
}

void CachingAllocator::release_pool(int id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto pool = pools_.find(id);
  if (pool == pools_.end()) return;
  if (active_ == id) active_ = 0;
  for (auto& [c, v] : pool->second)
    for (void* q : v) {
      pool_of_.erase(q);
      free_[c].push_back(q);
    }
  pools_.erase(pool);
}

int CachingAllocator::active_pool() const {
  std::lock_guard<std::mutex> lock(mu_);
  return active_;
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
