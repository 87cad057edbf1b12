// The mixing data loader: draws documents from named token shards by weight, packs them
// into fixed-length sequences with document ids (for the document attention mask), shards
// the stream across data-parallel ranks, prefetches on a background thread, and can save
// and restore its exact position. This header is the contract the trainer codes against.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace llama3::data {

struct SourceSpec {
  std::string name;                 // e.g. "general", "math", "code", "multilingual"
  std::vector<std::string> shards;  // paths of token shards written by `llama3 data tokenize`
  double weight = 1.0;              // relative sampling weight (normalised over sources)
  // Documents never straddle a row boundary: one that does not fit in the rest of the
  // current row starts the next row instead, and the rest of the row is padding (target -1,
  // a document id of its own). For short task documents whose end depends on their start
  // (generated pass-key documents: the answer needs the needle), which the document mask
  // would otherwise cut apart. A document longer than a row still starts one.
  bool no_straddle = false;
  // > 0: only targets that are one of the last `loss_last_tokens` tokens of their document
  // carry loss (the others are -1): task documents that end with their answer (a pass key
  // and EOS) train the answer, not the filler around it.
  int64_t loss_last_tokens = 0;
};

struct LoaderConfig {
  std::vector<SourceSpec> sources;
  int64_t seq_len = 256;     // tokens per sequence
  int64_t batch_size = 8;    // sequences per batch on this rank
  int dp_rank = 0;           // this rank's index among data-parallel ranks
  int dp_size = 1;
  uint64_t seed = 1234;
  int prefetch = 2;          // batches prepared ahead on the background thread
};

// One batch: row-major (batch_size, seq_len) arrays. targets[i] is the token after tokens[i]
// in the packed stream (-1 on padding: no loss); doc_ids[i] numbers the documents within each
// row (0, 1, 2, ...), so a token attends only to earlier tokens with the same doc id.
struct Batch {
  int64_t batch_size = 0, seq_len = 0;
  std::vector<int32_t> tokens;   // (B, T)
  std::vector<int32_t> targets;  // (B, T)
  std::vector<int32_t> doc_ids;  // (B, T)
};

class MixingLoader {
 public:
  explicit MixingLoader(const LoaderConfig& cfg);
  ~MixingLoader();
  Batch next();
  // Changes the mix from the next batch on (annealing up-weights sources).
  void set_weights(const std::vector<double>& weights);
  // Exact position (includes the RNG and partially consumed documents); restoring it makes
  // next() return the same batches the saved loader would have returned.
  nlohmann::json state() const;
  void restore(const nlohmann::json& state);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace llama3::data
