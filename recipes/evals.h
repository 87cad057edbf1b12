// Stage evaluations and model surgery used by the recipe runner:
//  - held-out loss over an eval shard at a given sequence length (always the same batches);
//  - unigram entropy of a shard (the loss of the best context-free model, a floor to beat);
//  - needle-in-a-haystack: a "The pass key is NNNN." line at a random depth of filler text,
//    a question at the end, and the candidates (the key + distractors split into tokens the
//    same way, e.g. [80][6][4] vs [57][9][5]) scored by likelihood; accuracy = share of prompts where the key wins (chance =
//    1/candidates). The same generator writes synthetic training documents so a tiny model
//    can learn retrieval during long-context training;
//  - checkpoint averaging (uniform or weighted element-wise mean).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "text/data/loader.h"
#include "text/model/llama.h"
#include "text/tokenizer/tokenizer.h"

namespace llama3::recipes {

double eval_loss(const text::LlamaModel& model, const std::vector<data::SourceSpec>& eval_sources,
                 int64_t seq_len, int64_t batch_size, int64_t batches);

// Natural-log entropy of the token distribution of the shards.
double unigram_entropy(const std::vector<std::string>& shards);

class Needles {
 public:
  // Filler text: the shards' tokens with special tokens (BOS/EOS) removed. Pass keys have
  // key_digits digits (1: one of 0..9, a single token after the space).
  Needles(const text::Tokenizer& tok, const std::vector<std::string>& filler_shards, int key_digits = 1);

  struct Prompt {
    std::vector<int32_t> context;                  // BOS + filler + needle + filler + question
    std::vector<std::vector<int32_t>> candidates;  // equal token counts; [answer] is the key
    int answer = 0;
  };
  // A prompt whose context + candidate is exactly `length` tokens.
  Prompt prompt(int64_t length, int candidates, uint64_t seed) const;
  // Writes `docs` training documents (BOS prompt answer EOS) of lengths in [min_len, max_len].
  void write_training_shard(const std::string& path, int64_t docs, int64_t min_len, int64_t max_len,
                            uint64_t seed) const;
  // An upper bound on the answer's tokens (the space, then at most one token per digit):
  // a training document's last answer_tokens() + 1 tokens hold its answer and EOS.
  int64_t answer_tokens() const { return 1 + key_digits_; }

 private:
  const text::Tokenizer& tok_;
  int key_digits_ = 1;
  std::vector<int32_t> filler_;
};

struct NiahResult {
  int64_t length = 0, samples = 0, correct = 0;
  double accuracy() const { return samples ? double(correct) / double(samples) : 0; }
};
NiahResult niah_eval(const text::LlamaModel& model, const Needles& needles, int64_t length, int64_t samples,
                     int candidates, uint64_t seed);

// Writes a checkpoint (model.safetensors + config.json) holding sum_i w_i * input_i with the
// weights normalised. Inputs must share config.json and every tensor's name, shape and dtype;
// a mismatch names the input and the tensor.
void average_checkpoints(const std::vector<std::string>& inputs, std::vector<double> weights,
                         const std::string& out_dir);

}  // namespace llama3::recipes
