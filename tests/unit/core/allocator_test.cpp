// CachingAllocator: size classes and reuse, and the private pools a CUDA graph capture
// allocates from (a block the captured step used never goes to anyone else while the graph
// lives, since every replay writes it again).
#include "runtime/core/allocator.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <set>

using namespace llama3;

namespace {

int g_raw_allocs = 0;
void* raw_alloc(size_t n) {
  ++g_raw_allocs;
  return std::malloc(n);
}
void raw_free(void* p) {
  std::free(p);
}

}  // namespace

TEST(CachingAllocator, FreedBlocksAreReusedBySizeClass) {
  CachingAllocator a(raw_alloc, raw_free);
  void* p = a.allocate(1000);
  a.deallocate(p, 1000);
  EXPECT_EQ(a.allocate(1010), p) << "same size class: the cached block";
  EXPECT_EQ(a.stats().n_system_allocs, 1u);
  void* q = a.allocate(5000);
  EXPECT_NE(q, p);
  EXPECT_EQ(a.stats().n_system_allocs, 2u);
}

TEST(CachingAllocator, PrivatePoolBlocksStayWithThePoolUntilReleased) {
  CachingAllocator a(raw_alloc, raw_free);
  void* cached = a.allocate(4096);
  a.deallocate(cached, 4096);
  const int pool = a.begin_pool();
  EXPECT_EQ(a.active_pool(), pool);
  void* inside = a.allocate(4096);
  EXPECT_EQ(inside, cached) << "a capture may take a free block of the shared cache";
  a.deallocate(inside, 4096);  // freed during the capture: back to the pool only
  void* again = a.allocate(4096);
  EXPECT_EQ(again, inside) << "reused within the same capture";
  void* kept = a.allocate(4096);  // still in use after the capture (a gradient, a loss)
  a.deallocate(again, 4096);
  a.end_pool();
  EXPECT_EQ(a.active_pool(), 0);
  // Outside the capture nothing of the pool is handed out, freed before or after it ended.
  a.deallocate(kept, 4096);
  std::set<void*> outside;
  for (int i = 0; i < 4; ++i) outside.insert(a.allocate(4096));
  EXPECT_EQ(outside.count(inside), 0u);
  EXPECT_EQ(outside.count(kept), 0u);
  // A second capture into a new pool does not see the first pool's blocks either.
  const int pool2 = a.begin_pool();
  EXPECT_NE(pool2, pool);
  void* other = a.allocate(4096);
  EXPECT_NE(other, inside);
  EXPECT_NE(other, kept);
  a.end_pool();
  // Released (the graph destroyed): the pool's free blocks return to the shared cache.
  a.release_pool(pool);
  std::set<void*> after;
  for (int i = 0; i < 2; ++i) after.insert(a.allocate(4096));
  EXPECT_EQ(after, (std::set<void*>{inside, kept}));
}

TEST(CachingAllocator, BlockInUseWhenItsPoolIsReleasedReturnsToTheSharedCache) {
  CachingAllocator a(raw_alloc, raw_free);
  const int pool = a.begin_pool();
  void* held = a.allocate(700);
  a.end_pool();
  a.release_pool(pool);
  a.deallocate(held, 700);  // its pool is gone
  EXPECT_EQ(a.allocate(700), held);
  EXPECT_THROW(
      {
        a.begin_pool();
        a.begin_pool();
      },
      std::exception)
      << "captures do not nest";
}
