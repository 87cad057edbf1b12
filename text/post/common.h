// Shared pieces of the post-training stages: stage results (flat metrics written to
// <out>/final.json), loading/saving a policy with its tokenizer, fresh initialisation, the
// small AdamW loop every stage uses, and greedy exact-match evaluation.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/io/safetensors.h"
#include "text/generate/generate.h"
#include "text/model/llama.h"
#include "text/post/chat.h"

namespace llama3::text::post {

struct PostStageResult {
  std::string out_dir;    // the stage's checkpoint / data directory
  nlohmann::json metrics;  // flat: name -> number (also written to out_dir/final.json)
};

// Where a stage's starting model comes from: a checkpoint directory, or (when dir is
// empty) a fresh model of a flavour sized to the tokenizer's vocabulary.
struct ModelSource {
  std::string dir;
  std::string flavour = "debug";
  uint64_t seed = 0;
  int64_t max_seq_len = 0;  // > 0 overrides the flavour's context (fresh models only)
  std::string tokenizer;    // default: <dir>/tokenizer.model
};

struct Policy {
  std::unique_ptr<LlamaModel> model;
  Tokenizer tok;
  std::string tokenizer_path;
  io::TensorMap extra;  // tensors in model.safetensors beyond the LM (e.g. score.weight)
};
Policy load_policy(const ModelSource& src);

// Saves the model (HF names), extra tensors, config.json and a copy of the tokenizer.
void save_policy(const LlamaModel& m, const std::string& tokenizer_path, const std::string& dir,
                 const io::TensorMap& extra = {});

// Writes metrics as flat JSON to dir/final.json.
void write_final(const std::string& dir, const nlohmann::json& metrics);

// One JSON object per line (per-pair or per-prompt records a reader can inspect); throws naming
// the path when it cannot be written.
void write_jsonl(const std::string& path, const std::vector<nlohmann::json>& rows);

struct TrainLoopOptions {
  int64_t steps = 100;
  float lr = 1e-3f;
  int64_t warmup = 10;
  float weight_decay = 0.f;
  float max_grad_norm = 1.f;
  int64_t log_every = 20;
  std::string tag = "train";
  // Called after every update (1-based step, the step's loss, its LR): the recipe runner
  // writes these to the stage's metrics.jsonl.
  std::function<void(int64_t step, double loss, float lr)> on_step;
};
// AdamW over params; loss_fn(step) returns the scalar loss of one step. Returns the mean
// loss of the last 10% of steps.
double train_loop(const std::vector<nn::NamedParam>& params, const TrainLoopOptions& opt,
                  const std::function<Tensor(int64_t)>& loss_fn);

// Greedy responses to prompts (batched) and the fraction equal to their answers (trimmed).
std::vector<std::string> respond(const LlamaModel& m, const Tokenizer& tok, const std::vector<DialogRecord>& prompts,
                                 const SamplingOptions& opt);
double exact_match(const std::vector<std::string>& responses, const std::vector<DialogRecord>& prompts);

std::string trim(const std::string& s);

// Decodes generated ids to valid UTF-8 (a model may emit byte tokens that do not form
// characters; those become U+FFFD), so responses can be stored as JSON and re-encoded.
std::string decode_text(const Tokenizer& tok, const std::vector<int32_t>& ids);

}  // namespace llama3::text::post
