// Tokenizer: loading tiktoken files, encoding (Llama 3 limits -> specials -> regex pieces ->
// byte-level BPE by rank) and decoding. The merge order is tiktoken's exactly (repeatedly
// merge the adjacent pair whose concatenation has the lowest rank, leftmost first), so ids
// match tiktoken token for token.
#include "text/tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "runtime/core/error.h"
#include "text/tokenizer/pretokenize.h"
#include "text/tokenizer/rank_map.h"
#include "text/tokenizer/special_tokens.h"
#include "text/tokenizer/tiktoken_file.h"
#include "text/tokenizer/utf8.h"

namespace llama3::text {

namespace {

uint64_t next_instance() {
  static std::atomic<uint64_t> counter{0};
  return ++counter;
}

// Results of BPE for short pieces that are not themselves tokens, per thread. Natural text
// repeats such pieces constantly, and a hit replaces the ~3n rank lookups of a merge with
// one compare. Direct-mapped: a collision simply overwrites.
struct MergeCache {
  static constexpr size_t kSlots = 1 << 14;
  static constexpr size_t kMaxBytes = 23;
  static constexpr size_t kMaxIds = 8;
  struct Slot {
    uint64_t hash = 0;
    uint64_t owner = 0;  // Tokenizer::Impl::instance; 0 = empty
    uint8_t len = 0;
    uint8_t n_ids = 0;
    char bytes[kMaxBytes];
    int32_t ids[kMaxIds];
  };
  std::vector<Slot> slots = std::vector<Slot>(kSlots);
};

MergeCache& merge_cache() {
  thread_local MergeCache cache;
  return cache;
}

}  // namespace

std::vector<std::string> llama3_special_names() {
  std::vector<std::string> names = {
      "<|begin_of_text|>",
      "<|end_of_text|>",
      "<|reserved_special_token_0|>",
      "<|reserved_special_token_1|>",
      "<|finetune_right_pad_id|>",
      "<|step_id|>",
      "<|start_header_id|>",
      "<|end_header_id|>",
      "<|eom_id|>",
      "<|eot_id|>",
      "<|python_tag|>",
  };
  // Meta numbers the remaining reserved tokens from 2 (0 and 1 sit at +2 and +3).
  for (int k = 2; names.size() < kNumSpecialTokens; ++k)
    names.push_back("<|reserved_special_token_" + std::to_string(k) + "|>");
  return names;
}

struct Tokenizer::Impl {
  const uint64_t instance = next_instance();  // keys the thread-local merge cache
  std::string arena;                          // all base token bytes, rank order
  std::vector<uint32_t> offsets;              // token r = arena[offsets[r], offsets[r+1])
  RankMap ranks;
  std::vector<std::string> special_names;
  std::unordered_map<std::string_view, int32_t> special_ids;  // views into special_names
  Pretokenizer pretokenizer;

  int32_t n_base() const { return static_cast<int32_t>(offsets.size() - 1); }

  void encode_ordinary(std::string_view text, std::vector<std::string_view>& pieces,
                       std::vector<int32_t>& out) const;
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;
  void bpe_short(const char* p, size_t n, std::vector<int32_t>& out) const;
  void bpe_long(const char* p, size_t n, std::vector<int32_t>& out) const;
};

namespace {

constexpr uint32_t kNoRank = 0xFFFFFFFFu;
// Pieces up to this many bytes use tiktoken's quadratic scan (fast for the short pieces
// that dominate text); longer ones a heap over a linked list, O(n log n).
constexpr size_t kShortPiece = 128;

}  // namespace

void Tokenizer::Impl::bpe_short(const char* p, size_t n, std::vector<int32_t>& out) const {
  std::array<uint32_t, kShortPiece + 1> start;
  std::array<uint32_t, kShortPiece> rank;  // rank of parts (i, i+1) concatenated
  const auto find = [&](uint32_t a, uint32_t b) -> uint32_t {
    return static_cast<uint32_t>(ranks.find(p + a, b - a));  // kNone (-1) -> kNoRank
  };
  size_t m = n;  // number of parts
  for (size_t i = 0; i <= n; ++i) start[i] = static_cast<uint32_t>(i);
  for (size_t i = 0; i + 1 < n; ++i) rank[i] = find(start[i], start[i + 2]);
  rank[n - 1] = kNoRank;
  while (m > 1) {
    uint32_t best = kNoRank;
    size_t bi = 0;
    for (size_t i = 0; i + 1 < m; ++i) {
      if (rank[i] < best) {
        best = rank[i];
        bi = i;
      }
    }
    if (best == kNoRank) break;
    // Merge parts bi and bi+1: drop start[bi+1].
    std::memmove(&start[bi + 1], &start[bi + 2], (m - bi - 1) * sizeof(uint32_t));
    std::memmove(&rank[bi + 1], &rank[bi + 2], (m - bi - 2) * sizeof(uint32_t));
    --m;
    rank[bi] = bi + 1 < m ? find(start[bi], start[bi + 2]) : kNoRank;
    if (bi > 0) rank[bi - 1] = find(start[bi - 1], start[bi + 1]);
  }
  for (size_t i = 0; i < m; ++i) out.push_back(static_cast<int32_t>(find(start[i], start[i + 1])));
}

void Tokenizer::Impl::bpe_long(const char* p, size_t n, std::vector<int32_t>& out) const {
  // Node k is the part starting at byte k; next[k] is the next part's start (n at the end).
  std::vector<uint32_t> next(n), prev(n), rank(n);
  using Entry = uint64_t;  // rank << 32 | start: min-heap order = lowest rank, then leftmost
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  const auto find = [&](uint32_t a, uint32_t b) -> uint32_t {
    return static_cast<uint32_t>(ranks.find(p + a, b - a));
  };
  for (uint32_t i = 0; i < n; ++i) {
    next[i] = i + 1;
    prev[i] = i - 1;  // unused for i == 0
    rank[i] = i + 1 < n ? find(i, i + 2) : kNoRank;
    if (rank[i] != kNoRank) heap.push(Entry(rank[i]) << 32 | i);
  }
  std::vector<bool> alive(n, true);
  while (!heap.empty()) {
    const Entry e = heap.top();
    heap.pop();
    const uint32_t r = static_cast<uint32_t>(e >> 32), i = static_cast<uint32_t>(e);
    if (!alive[i] || rank[i] != r) continue;  // stale
    const uint32_t j = next[i];
    alive[j] = false;
    next[i] = next[j];
    if (next[i] < n) prev[next[i]] = i;
    rank[i] = next[i] < n ? find(i, next[next[i]]) : kNoRank;
    if (rank[i] != kNoRank) heap.push(Entry(rank[i]) << 32 | i);
    if (i > 0) {
      const uint32_t q = prev[i];
      rank[q] = find(q, next[i]);
      if (rank[q] != kNoRank) heap.push(Entry(rank[q]) << 32 | q);
    }
  }
  for (uint32_t i = 0; i < n; i = next[i]) out.push_back(static_cast<int32_t>(find(i, next[i])));
}

void Tokenizer::Impl::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  const char* p = piece.data();
  const size_t n = piece.size();
  const uint64_t h = hash_bytes(p, n);
  const int32_t whole = ranks.find(p, n, h);
  if (whole != RankMap::kNone) {
    out.push_back(whole);
    return;
  }
  if (n > kShortPiece) {
    bpe_long(p, n, out);
    return;
  }
  if (n > MergeCache::kMaxBytes) {
    bpe_short(p, n, out);
    return;
  }
  MergeCache::Slot& slot = merge_cache().slots[h & (MergeCache::kSlots - 1)];
  if (slot.owner == instance && slot.hash == h && slot.len == n &&
      std::memcmp(slot.bytes, p, n) == 0) {
    out.insert(out.end(), slot.ids, slot.ids + slot.n_ids);
    return;
  }
  const size_t before = out.size();
  bpe_short(p, n, out);
  const size_t n_ids = out.size() - before;
  if (n_ids <= MergeCache::kMaxIds) {
    slot.owner = instance;
    slot.hash = h;
    slot.len = static_cast<uint8_t>(n);
    slot.n_ids = static_cast<uint8_t>(n_ids);
    std::memcpy(slot.bytes, p, n);
    std::copy(out.begin() + before, out.end(), slot.ids);
  }
}

void Tokenizer::Impl::encode_ordinary(std::string_view text, std::vector<std::string_view>& pieces,
                                      std::vector<int32_t>& out) const {
  pieces.clear();
  pretokenizer.split(text, pieces);
  for (std::string_view piece : pieces) encode_piece(piece, out);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  TiktokenVocab vocab = read_tiktoken_file(path);
  impl->arena = std::move(vocab.arena);
  impl->offsets = std::move(vocab.offsets);
  impl->ranks.build(&impl->arena, &impl->offsets);
  impl->special_names = llama3_special_names();
  for (size_t k = 0; k < impl->special_names.size(); ++k)
    impl->special_ids.emplace(impl->special_names[k], impl->n_base() + static_cast<int32_t>(k));
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, const EncodeOptions& opts) const {
  std::string repaired;
  const size_t bad = utf8::find_invalid(text);
  if (bad != utf8::kValid) {
    if (opts.invalid_utf8 == InvalidUtf8::kError)
      fail("tokenizer encode: invalid UTF-8 at byte offset {} (byte 0x{:02X})", bad,
           static_cast<unsigned char>(text[bad]));
    repaired = utf8::replace_invalid(text);
    text = repaired;
  }
  thread_local std::vector<std::string_view> chunks, pieces;
  chunks.clear();
  split_llama3_limits(text, chunks);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 16);
  for (std::string_view chunk : chunks) {
    if (opts.specials == SpecialTokens::kDisallow) {
      impl_->encode_ordinary(chunk, pieces, out);
      continue;
    }
    // Leftmost special token: all are "<|name|>" with no "|>" inside, so a match starting
    // at a "<|" ends at the first "|>" after it.
    size_t seg = 0, pos = 0;
    while ((pos = chunk.find("<|", pos)) != std::string_view::npos) {
      const size_t end = chunk.find("|>", pos + 2);
      if (end == std::string_view::npos) break;
      const auto it = impl_->special_ids.find(chunk.substr(pos, end + 2 - pos));
      if (it == impl_->special_ids.end()) {
        pos += 1;
        continue;
      }
      impl_->encode_ordinary(chunk.substr(seg, pos - seg), pieces, out);
      out.push_back(it->second);
      pos = seg = end + 2;
    }
    impl_->encode_ordinary(chunk.substr(seg), pieces, out);
  }
  return out;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(std::span<const std::string> texts,
                                                          const EncodeOptions& opts) const {
  std::vector<std::vector<int32_t>> out(texts.size());
  std::string first_error;
  const long n = static_cast<long>(texts.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (long i = 0; i < n; ++i) {
    // Exceptions must not leave an OpenMP region: keep the first and rethrow after.
    try {
      out[i] = encode(texts[i], opts);
    } catch (const std::exception& e) {
#pragma omp critical(llama3_tokenizer_batch_error)
      if (first_error.empty()) first_error = fmt::format("text {}: {}", i, e.what());
    }
  }
  if (!first_error.empty()) throw Error(first_error);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string out;
  const int32_t nb = impl_->n_base();
  for (int32_t id : ids) {
    if (id >= 0 && id < nb) {
      out += impl_->ranks.token(id);
    } else if (id >= nb && id < nb + static_cast<int32_t>(kNumSpecialTokens)) {
      out += impl_->special_names[id - nb];
    } else {
      fail("tokenizer decode: id {} out of range [0, {})", id, vocab_size());
    }
  }
  return out;
}

int32_t Tokenizer::n_base() const {
  return impl_->n_base();
}
int32_t Tokenizer::vocab_size() const {
  return impl_->n_base() + static_cast<int32_t>(kNumSpecialTokens);
}

int32_t Tokenizer::special_id(std::string_view name) const {
  const auto it = impl_->special_ids.find(name);
  if (it == impl_->special_ids.end())
    fail(
        "tokenizer: unknown special token '{}' (names look like <|eot_id|>, "
        "<|reserved_special_token_2|>)",
        name);
  return it->second;
}

}  // namespace llama3::text
