// Device memory allocators. Every tensor's storage comes from its device's caching
// allocator, which keeps freed blocks in size classes so a training step that repeats the
// same shapes allocates from the OS only during its first iteration.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

namespace llama3 {

struct AllocatorStats {
  size_t in_use = 0;       // bytes handed out now
  size_t peak_in_use = 0;  // high-water mark of in_use since the last reset
  size_t reserved = 0;     // bytes held from the system (in use + cached)
  size_t n_system_allocs = 0;
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p, size_t bytes) = 0;
  virtual AllocatorStats stats() const = 0;
  virtual void reset_peak() = 0;
  virtual void empty_cache() = 0;  // returns cached blocks to the system
};

// Caching allocator over a raw system allocator (malloc for CPU, cudaMalloc for CUDA).
// Sizes are rounded up to a size class (1/8 power-of-two steps) so that blocks are reused
// across slightly different shapes with bounded waste.
class CachingAllocator : public Allocator {
 public:
  using RawAlloc = void* (*)(size_t);
  using RawFree = void (*)(void*);
  CachingAllocator(RawAlloc raw_alloc, RawFree raw_free) : raw_alloc_(raw_alloc), raw_free_(raw_free) {}
  ~CachingAllocator() override;
  void* allocate(size_t bytes) override;
  void deallocate(void* p, size_t bytes) override;
  AllocatorStats stats() const override;
  void reset_peak() override;
  void empty_cache() override;
  static size_t size_class(size_t bytes);

  // Private pools, for CUDA graph capture. A graph replays its kernels on the addresses they
  // had at capture, so the blocks a captured step allocates must stay its own for as long as
  // the graph lives, even those its host code freed during the capture (their contents are
  // rewritten by every replay). Between begin_pool() and end_pool() every allocation is
  // taken from the new pool's free blocks, else from the shared cache or the system, and
  // becomes the pool's; a pool block freed at any time returns to its pool, which only
  // allocations under that pool reuse. release_pool(id) returns the pool's free blocks to
  // the shared cache, and its blocks still in use return there when freed.
  int begin_pool();
  void end_pool();
  void release_pool(int id);
  // The pool allocations currently go to (0: the shared cache).
  int active_pool() const;

 private:
  using FreeLists = std::map<size_t, std::vector<void*>>;  // size class -> cached blocks
  RawAlloc raw_alloc_;
  RawFree raw_free_;
  mutable std::mutex mu_;
  FreeLists free_;
  AllocatorStats stats_;
  int active_ = 0, next_pool_ = 1;
  std::map<int, FreeLists> pools_;       // live private pools: their free blocks
  std::map<void*, int> pool_of_;         // block -> the private pool it belongs to
  void* take(FreeLists& f, size_t cls);  // a cached block of class cls, or null
};

// The CPU caching allocator (64-byte aligned blocks).
Allocator& cpu_allocator();

}  // namespace llama3
