// RankMap: byte string -> BPE rank, the hot lookup of encoding. Open addressing over a
// table of (hash tag, rank) with the token bytes kept once in an arena shared with the
// decoder, so a probe touches one cache line until the tags agree.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace llama3::text {

inline uint64_t hash_bytes(const char* p, size_t n) {
  constexpr uint64_t kMul = 0x9E3779B97F4A7C15ull;
  uint64_t h = n * kMul;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * kMul;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  if (n) {
    uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = (h ^ w) * kMul;
    h ^= h >> 29;
  }
  h *= 0xBF58476D1CE4E5B9ull;
  return h ^ (h >> 32);
}

class RankMap {
 public:
  static constexpr int32_t kNone = -1;

  // token(r) is the byte string of rank r; ranks must be 0..n-1 and distinct.
  void build(const std::string* arena, const std::vector<uint32_t>* offsets) {
    arena_ = arena;
    offs_ = offsets;
    const size_t n = offsets->size() - 1;
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    mask_ = cap - 1;
    slots_.assign(cap, Slot{0, kNone});
    for (size_t r = 0; r < n; ++r) {
      std::string_view t = token(static_cast<int32_t>(r));
      const uint64_t h = hash_bytes(t.data(), t.size());
      size_t i = h & mask_;
      while (slots_[i].rank != kNone) i = (i + 1) & mask_;
      slots_[i] = Slot{static_cast<uint32_t>(h >> 32), static_cast<int32_t>(r)};
    }
  }

  std::string_view token(int32_t r) const {
    const uint32_t a = (*offs_)[r], b = (*offs_)[r + 1];
    return std::string_view(arena_->data() + a, b - a);
  }

  int32_t find(const char* p, size_t n) const { return find(p, n, hash_bytes(p, n)); }

  // With h = hash_bytes(p, n) already computed by the caller.
  int32_t find(const char* p, size_t n, uint64_t h) const {
    const uint32_t tag = static_cast<uint32_t>(h >> 32);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot s = slots_[i];
      if (s.rank == kNone) return kNone;
      if (s.tag == tag) {
        const uint32_t a = (*offs_)[s.rank], b = (*offs_)[s.rank + 1];
        if (b - a == n && std::memcmp(arena_->data() + a, p, n) == 0) return s.rank;
      }
    }
  }

 private:
  struct Slot {
    uint32_t tag;
    int32_t rank;
  };
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  const std::string* arena_ = nullptr;
  const std::vector<uint32_t>* offs_ = nullptr;
};

}  // namespace llama3::text
