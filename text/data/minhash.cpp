#include "text/data/minhash.h"

#include <algorithm>
#include <string>

#include "runtime/core/error.h"
#include "text/data/text_clean.h"

namespace llama3::data {
namespace {
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
}  // namespace

MinHashDedup::MinHashDedup(const MinHashOptions& o) : o_(o), bands_(o.bands) {
  LLAMA3_CHECK(o.shingle > 0 && o.bands > 0 && o.rows > 0,
               "minhash: shingle {}, bands {}, rows {} must be positive", o.shingle, o.bands,
               o.rows);
  LLAMA3_CHECK(o.threshold > 0 && o.threshold <= 1, "minhash: threshold {} must be in (0, 1]",
               o.threshold);
  uint64_t s = o.seed;
  for (int i = 0; i < o.bands * o.rows; ++i) salts_.push_back(mix64(s += 0x9E3779B97F4A7C15ull));
}

std::vector<uint32_t> MinHashDedup::signature(std::string_view text) const {
  std::vector<uint64_t> words;
  for_each_word(text, [&](std::string_view w) { words.push_back(hash64(w)); });
  std::vector<uint64_t> shingles;
  if (words.size() <= size_t(o_.shingle)) {
    uint64_t h = 0;
    for (auto w : words) h = mix64(h ^ w);
    shingles.push_back(h);
  } else {
    for (size_t i = 0; i + o_.shingle <= words.size(); ++i) {
      uint64_t h = 0;
      for (int k = 0; k < o_.shingle; ++k) h = mix64(h * 31 + words[i + k]);
      shingles.push_back(h);
    }
  }
  std::sort(shingles.begin(), shingles.end());
  shingles.erase(std::unique(shingles.begin(), shingles.end()), shingles.end());
  std::vector<uint32_t> sig(salts_.size(), UINT32_MAX);
  for (uint64_t sh : shingles)
    for (size_t i = 0; i < salts_.size(); ++i)
      sig[i] = std::min(sig[i], uint32_t(mix64(sh ^ salts_[i]) >> 32));
  return sig;
}

double MinHashDedup::similarity(const std::vector<uint32_t>& a, const uint32_t* b) {
  size_t eq = 0;
  for (size_t i = 0; i < a.size(); ++i) eq += a[i] == b[i];
  return double(eq) / double(a.size());
}

double MinHashDedup::check_and_insert(std::string_view text, bool* kept) {
  return check_and_insert(signature(text), kept);
}

double MinHashDedup::check_and_insert(const std::vector<uint32_t>& sig, bool* kept) {
  LLAMA3_CHECK(sig.size() == salts_.size(), "minhash: signature has {} rows, expected {}",
               sig.size(), salts_.size());
  std::vector<uint64_t> keys(o_.bands);
  double best = 0;
  for (int b = 0; b < o_.bands; ++b) {
    uint64_t k = mix64(uint64_t(b) + 1);
    for (int r = 0; r < o_.rows; ++r) k = mix64(k ^ sig[b * o_.rows + r]);
    keys[b] = k;
    auto [lo, hi] = bands_[b].equal_range(k);
    for (auto it = lo; it != hi; ++it)
      best = std::max(best, similarity(sig, &sigs_[size_t(it->second) * sig.size()]));
  }
  *kept = best < o_.threshold;
  if (*kept) {
    for (int b = 0; b < o_.bands; ++b) bands_[b].emplace(keys[b], uint32_t(n_docs_));
    sigs_.insert(sigs_.end(), sig.begin(), sig.end());
    ++n_docs_;
  }
  return best;
}

}  // namespace llama3::data
