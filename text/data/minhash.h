// Near-duplicate detection with MinHash signatures and locality-sensitive hashing (paper
// 3.1.1, "document-level de-duplication"). Only signatures and band keys are kept, never
// documents, so memory grows by bands*rows*4 bytes (+ band keys) per kept document.
#pragma once

#include <cstdint>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace llama3::data {

struct MinHashOptions {
  int shingle = 5;         // words per shingle
  int bands = 16;          // LSH bands
  int rows = 8;            // signature rows per band (signature length = bands*rows)
  double threshold = 0.8;  // estimated Jaccard at or above which a document is a duplicate
  uint64_t seed = 0x5eed;
};

class MinHashDedup {
 public:
  explicit MinHashDedup(const MinHashOptions& opts);
  std::vector<uint32_t> signature(std::string_view text) const;
  // Estimated Jaccard similarity of two signatures (fraction of equal rows).
  static double similarity(const std::vector<uint32_t>& a, const uint32_t* b);
  // Looks the document up among those inserted before; returns the highest estimated
  // Jaccard of an LSH candidate (0 if none). If it is below the threshold, the document is
  // inserted (it is kept) and `kept` is true.
  double check_and_insert(std::string_view text, bool* kept);
  // The same with a signature computed beforehand (signatures can be computed in parallel;
  // insertion must go in order).
  double check_and_insert(const std::vector<uint32_t>& sig, bool* kept);
  size_t size() const { return n_docs_; }

 private:
  MinHashOptions o_;
  std::vector<uint64_t> salts_;
  std::vector<uint32_t> sigs_;  // (n_docs, bands*rows)
  size_t n_docs_ = 0;
  std::vector<std::unordered_multimap<uint64_t, uint32_t>> bands_;  // band key -> doc
};

}  // namespace llama3::data
