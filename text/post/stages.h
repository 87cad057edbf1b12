// The post-training stages as library functions (one options struct each), called by the
// `llama3 post ...` commands and by the recipe runner's stage kinds: reward model, SFT,
// rejection sampling, DPO, checkpoint averaging, and the iterative-rounds driver. Each
// writes its checkpoint or data plus a flat final.json of metrics into its out_dir.
#pragma once

#include <string>
#include <vector>

#include "text/post/common.h"

namespace llama3::text::post {

// ---- SFT: cross-entropy on assistant tokens only, several dialogs packed per row ----

// A packed batch: inputs, next-token labels, and which labels count (assistant content and,
// optionally, the assistant's terminator); doc_ids keep packed dialogs apart.
struct PackedBatch {
  int64_t B = 0, T = 0;
  std::vector<int32_t> tokens, labels, doc_ids;
  std::vector<uint8_t> loss_mask;
  Tensor tokens_t() const;
  Tensor targets_t() const;  // labels where loss_mask, else -1
  Tensor doc_ids_t() const;
};
// Which rendered tokens SFT trains on: assistant content, plus its terminator when asked
// (the model must learn to stop).
bool sft_target(TokenKind k, bool with_termination);
// Packs dialogs (greedy first-fit in order) into rows of T positions.
std::vector<PackedBatch> pack_dialogs(const std::vector<Rendered>& dialogs, int64_t T,
                                      int64_t rows_per_batch, bool with_termination,
                                      int32_t pad_id);

struct SftOptions {
  ModelSource model;
  std::vector<std::string> data;  // dialog JSONL files
  std::string eval_prompts;       // prompts with answers (exact match); optional
  std::string out_dir;
  int64_t steps = 200, batch = 8, seq = 128;
  TrainLoopOptions train;  // steps/lr/... (steps overrides train.steps)
  bool train_on_termination = true;
  LoadOptions load;
  int64_t max_new_tokens = 24;
  uint64_t seed = 0;
};
PostStageResult run_sft(const SftOptions& o);
// Greedy exact match of a policy on prompts with answers: eval_exact_match, eval_prompts.
nlohmann::json exact_match_eval(const LlamaModel& m, const Tokenizer& tok,
                                const std::string& eval_prompts, int64_t max_new_tokens,
                                const LoadOptions& load);
nlohmann::json evaluate_policy(const ModelSource& model, const std::string& eval_prompts,
                               int64_t max_new_tokens);

// ---- Reward model: the LM with a scalar head on the final token ----

class RewardModel {
 public:
  RewardModel(Policy p);  // score.weight from p.extra, or zero-initialised
  // Scores of full rendered sequences (each scored at its last token).
  Tensor scores(const std::vector<std::vector<int32_t>>& seqs) const;  // (n)
  std::vector<double> score_responses(const Dialog& prompt,
                                      const std::vector<std::string>& responses) const;
  std::vector<nn::NamedParam> parameters();
  void save(const std::string& dir) const;
  Policy policy;
  Tensor score;  // (1, dim) "score.weight"
};

// A subset of `prefs` (kept in order) in which no response text seen in both roles appears
// more often as the chosen answer, or as the rejected one, than min(times chosen, times
// rejected) in `prefs`: a pair is kept while both of its responses have room left in their
// roles. A response only ever chosen (or only rejected) has no limit: it belongs to its own
// prompts, so no frequency across prompts is there to learn. Edited responses are not counted.
std::vector<Preference> balance_response_pairs(const std::vector<Preference>& prefs);

struct RewardOptions {
  ModelSource model;
  std::vector<std::string> prefs;  // preference JSONL files
  // On-policy pairs (the policy's own correct vs wrong samples, rejection sampling's
  // verified_prefs.jsonl): pooled with prefs, or, with on_policy_fraction > 0, that share of
  // every batch is drawn from them (so a few hundred of them are not drowned by thousands of
  // generated pairs).
  std::vector<std::string> on_policy_prefs;
  double on_policy_fraction = 0;
  // Keep only on-policy pairs such that each response text is chosen as often as rejected
  // (balance_response_pairs): no answer-frequency prior to learn.
  bool balance_responses = false;
  std::string eval_prefs;  // held-out file; else eval_fraction of prefs
  // Held-out on-policy pairs (samples of the current policy on held-out prompts): they join
  // the held-out set, reported also on their own (eval_accuracy_on_policy).
  std::vector<std::string> eval_on_policy;
  // The held-out set common to every round: the generated held-out pairs plus these on-policy
  // pairs (an earlier policy's held-out samples, which no later RM trains on); reported as
  // eval_accuracy_common / eval_pairs_common, so RMs of different rounds, each evaluated above
  // on its own policy's (harder) samples, are also compared on the same pairs.
  std::vector<std::string> common_eval_on_policy;
  // An earlier RM checkpoint (e.g. the previous round's) evaluated on the same common pairs:
  // compared_eval_accuracy_common, and pair by pair common_fixed (this RM right, that one
  // wrong) and common_broken (the reverse). Its tokenizer is this model's.
  std::string compare_with;
  double eval_fraction = 0.1;
  std::string out_dir;
  // Every held-out pair scored, one JSONL record each (set: generated / on_policy /
  // common_on_policy, prompt, better, worse, both scores, correct, and compared_correct for the
  // compare_with RM); empty: <out_dir>/eval_pairs.jsonl.
  std::string pairs_path;
  int64_t steps = 100, batch = 8;
  TrainLoopOptions train;
  LoadOptions load;
  uint64_t seed = 0;
};
PostStageResult run_reward_model(const RewardOptions& o);
// Held-out pairwise accuracy of a reward-model checkpoint (e.g. an average of RMs):
// eval_accuracy, eval_pairs over the generated held-out pairs plus the on-policy ones, and
// each part on its own (eval_accuracy_generated, eval_accuracy_on_policy, with their counts);
// with common_eval_on_policy or compare_with, the common-set figures of RewardOptions too.
// With pairs_path, every scored pair is written there as run_reward_model's eval_pairs.jsonl.
nlohmann::json evaluate_reward_model(const ModelSource& model, const std::string& eval_prefs,
                                     const std::vector<std::string>& eval_on_policy = {},
                                     const std::vector<std::string>& common_eval_on_policy = {},
                                     const std::string& compare_with = "",
                                     const std::string& pairs_path = "");

// ---- Rejection sampling: K samples per prompt, the RM keeps the best ----

struct RejectionOptions {
  ModelSource policy;
  std::string reward_model;  // RM checkpoint dir; empty: sample and label with the verifier only
  std::string reward_model_tokenizer;  // default: <reward_model>/tokenizer.model
  std::string prompts;                 // prompt JSONL (or dialogs: the assistant turn is dropped)
  int64_t max_prompts = 0;             // > 0: only the first max_prompts usable prompts
  // Writes sft.jsonl (best responses with scores), prefs.jsonl (RM best vs RM worst),
  // verified_prefs.jsonl (for prompts with answers: every distinct sample the verifier
  // rejects, each against one it accepts; the verifier plays the paper's human annotator of
  // the latest model's samples) and samples.jsonl (per prompt every sample with its score
  // and verdict).
  std::string out_dir;
  int64_t k = 8;
  // With a reward model: also write ranked_prefs.jsonl, the RM's pairs on the prompts where
  // no sample verifies (ranked_wrong_pairs below). Where one does, the verifier ranks right
  // against wrong; where none does, only the RM can rank, as the paper's annotators rank every
  // response and not only the correct one first.
  bool rank_wrong_pairs = false;
  double min_score = -1e30;  // keep a prompt's best only if it scores at least this
  bool require_correct =
      false;  // choose the best among verified-correct samples only (prompts with answers)
  SamplingOptions sampling{.greedy = false,
                           .temperature = 1.0f,
                           .top_k = 0,
                           .top_p = 0.95f,
                           .max_new_tokens = 24,
                           .seed = 0,
                           .stop_ids = {}};
  LoadOptions load;
};
PostStageResult run_rejection_sampling(const RejectionOptions& o);
// The verifier's pairs among one prompt's K samples, as (chosen, rejected) indices: every
// distinct non-empty wrong sample, hardest first (highest score), each against a correct one
// (highest-scored first, cycling); none when no sample is correct.
std::vector<std::pair<size_t, size_t>> verified_pairs(const std::vector<std::string>& responses,
                                                      const std::vector<uint8_t>& correct,
                                                      const std::vector<double>& scores);
// The RM's pairs on a prompt none of whose samples verifies, as (chosen, rejected) indices: the
// RM's highest-scored non-empty response against every distinct response it scores lower
// (the lowest first). None when a sample verifies (the verifier's pairs decide there) or no
// two distinct responses score apart.
std::vector<std::pair<size_t, size_t>> ranked_wrong_pairs(const std::vector<std::string>& responses,
                                                          const std::vector<uint8_t>& correct,
                                                          const std::vector<double>& scores);

// ---- DPO ----

// A preference pair rendered for DPO: per response, inputs/labels with the loss mask over
// assistant content only (headers and the terminator masked out).
struct DpoRows {
  int64_t n = 0, T = 0;  // n pairs; rows 0..n-1 chosen, n..2n-1 rejected
  std::vector<int32_t> tokens, labels;
  std::vector<uint8_t> loss_mask;
  std::vector<int64_t> chosen_tokens;  // counted tokens per chosen response (NLL normaliser)
  Tensor targets_t() const;
};
DpoRows build_dpo_rows(const Tokenizer& tok, const std::vector<Preference>& pairs, int32_t pad_id);
struct DpoLossParts {
  Tensor loss;                  // dpo + alpha * nll
  std::vector<double> margins;  // (lc - refc) - (lr - refr) per pair
};
// policy log-probs vs reference log-probs (2n: chosen then rejected).
DpoLossParts dpo_loss(const LlamaModel& m, const DpoRows& rows,
                      const std::vector<double>& ref_logps, float beta, float alpha);
// Summed log-probs of the 2n rows under m (no grad).
std::vector<double> sequence_logps(const LlamaModel& m, const DpoRows& rows);

struct DpoOptions {
  ModelSource model;  // the starting (and reference) policy
  std::vector<std::string> prefs;
  std::string eval_prefs;
  double eval_fraction = 0.1;
  std::string reward_model;  // optional: win rate vs the starting model, judged by this RM
  std::string reward_model_tokenizer;  // default: <reward_model>/tokenizer.model
  std::string eval_prompts;            // prompts for the win rate / exact match
  std::string out_dir;
  float beta = 0.1f, alpha = 0.2f;
  int64_t steps = 100, batch = 8;
  TrainLoopOptions train;
  LoadOptions load;
  int64_t max_new_tokens = 24;
  uint64_t seed = 0;
  // With a reward model: the per-prompt win-rate records (JSONL: both responses, whether each
  // verifies, both scores, the outcome); empty: <out_dir>/win_rate.jsonl.
  std::string judged_path;
  // With a reward model, also the sampled win rate: K responses of each policy per prompt
  // (temperature 1, top-p 0.95), draw k against draw k (0: greedy only).
  int64_t win_rate_samples = 0;
};
PostStageResult run_dpo(const DpoOptions& o);
// Held-out evaluation of a DPO policy (e.g. an AVERAGE of DPO runs) against its starting
// policy, as run_dpo reports it: eval_accuracy (implicit reward margin > 0 on eval_prefs,
// reference log-probs from `reference`), eval_exact_match, and with a reward model
// win_rate_vs_start (greedy responses vs the reference's, ties half) with its win, tie and
// loss counts, how often the RM sides with the verifier where exactly one response verifies
// (judge_agrees_with_verifier / judge_disagrees_with_verifier), and with win_rate_samples the
// sampled win rate (win_rate_sampled, its interval win_rate_sampled_h, its counts).
struct DpoEvalOptions {
  ModelSource model, reference;
  std::string eval_prefs, eval_prompts;
  std::string reward_model, reward_model_tokenizer;
  float beta = 0.1f, alpha = 0.2f;
  int64_t max_new_tokens = 24;
  std::string judged_path;  // optional: the per-prompt win-rate records (JSONL), as run_dpo
                            // writes them to <out_dir>/win_rate.jsonl
  int64_t win_rate_samples = 0;  // as DpoOptions
};
nlohmann::json evaluate_dpo(const DpoEvalOptions& o);
// The pair DPO trains on: the best response against the worst (edited > chosen > rejected,
// so an edit, when present, is the chosen one).
Preference dpo_pair(const Preference& p);

// ---- Model averaging ----

struct AverageOptions {
  std::vector<std::string> models;  // checkpoint dirs of one architecture
  std::vector<double> weights;      // empty: uniform; else one per model (normalised)
  std::string out_dir;
};
PostStageResult run_average(const AverageOptions& o);

// ---- Default data: verifiable tasks ----

struct DefaultDataOptions {
  std::string out_dir;
  int64_t n_train = 600, n_eval = 60, n_pref = 600, n_prompts = 100;
  uint64_t seed = 0;
  std::string tokenizer;  // copy this tokenizer; empty: train a small BPE on the data
  int64_t bpe_vocab = 512;
};
// Writes sft.jsonl, prefs.jsonl, prompts.jsonl, eval.jsonl (prompts with answers),
// eval_prefs.jsonl and tokenizer.model.
PostStageResult make_default_data(const DefaultDataOptions& o);
// The verifier of the default tasks: is `response` right for the prompt's answer.
bool verify(const DialogRecord& prompt, const std::string& response);

// ---- Iterative rounds: RM -> RS -> SFT -> DPO, N times ----

struct RoundsOptions {
  std::string data_dir;  // from make_default_data
  ModelSource init;      // the pre-trained (or fresh) starting model
  std::string out_dir;
  int64_t rounds = 2;
  int64_t rm_steps = 150, sft_steps = 200, dpo_steps = 60, k = 8;
  int64_t batch = 8, seq = 128;
  float rm_lr = 1e-3f, sft_lr = 2e-3f, dpo_lr = 2e-4f;
  uint64_t seed = 0;
};
// Returns per-round metrics ("round1.rm.eval_accuracy", ...); writes out_dir/final.json.
PostStageResult run_rounds(const RoundsOptions& o);
RoundsOptions rounds_from_json(const nlohmann::json& j, const std::string& source);

}  // namespace llama3::text::post
