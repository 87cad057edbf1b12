#include "recipes/post_stages.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "recipes/metrics_sink.h"
#include "runtime/core/error.h"
#include "runtime/io/checkpoint.h"
#include "text/data/text_clean.h"
#include "text/post/stages.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace llama3::recipes {

namespace post = text::post;

bool is_post_kind(StageKind k) {
  return k == POST_DATA || k == SFT || k == REWARD_MODEL || k == REJECTION_SAMPLING || k == DPO;
}
bool post_produces_model(StageKind k) {
  return k == SFT || k == REWARD_MODEL || k == DPO;
}

namespace {

// Defaults of the option messages (0 fields mean these).
int64_t or_default(int64_t v, int64_t d) {
  return v > 0 ? v : d;
}
double or_default(double v, double d) {
  return v > 0 ? v : d;
}

bool makes_model(StageKind k) {
  return k == PRETRAIN || k == LONG_CONTEXT || k == ANNEAL || k == AVERAGE ||
         post_produces_model(k);
}

// A REWARD_MODEL stage, or an AVERAGE of REWARD_MODEL stages (the paper averages RMs).
bool is_reward_model(const Recipe& r, const LoadedRecipe& lr, int i) {
  const Stage& s = r.stage(i);
  if (s.kind() == REWARD_MODEL) return true;
  if (s.kind() != AVERAGE || s.average().stages_size() == 0 || s.average().checkpoints_size() > 0)
    return false;
  for (auto& n : s.average().stages()) {
    const int j = lr.stage_index(n);
    if (j < 0 || j >= i || !is_reward_model(r, lr, j)) return false;
  }
  return true;
}

struct PostChecker {
  const LoadedRecipe& lr;
  int stage;
  template <typename... Args>
  [[noreturn]] void error(const std::string& field, fmt::format_string<Args...> f,
                          Args&&... args) const {
    throw Error(fmt::format("{}: stage '{}' field {}: {}", lr.where(stage, field),
                            lr.recipe().stage(stage).name(), field,
                            fmt::format(f, std::forward<Args>(args)...)));
  }
  // The index of `ref`, an earlier stage.
  int earlier(const std::string& field, const std::string& ref) const {
    const int j = lr.stage_index(ref);
    if (j > stage)
      error(field, "'{}' is a later stage (stage {}); inputs must come from earlier stages", ref,
            j);
    if (j < 0 || j == stage) error(field, "no stage named '{}' before this one", ref);
    return j;
  }
};

std::string tokenizer_of_data_stage(const std::string& dir) {
  std::string p = dir + "/tokenizer.model";
  const std::string m = dir + "/manifest.json";
  if (fs::exists(m)) {
    json j = io::read_json(m);
    if (j.contains("tokenizer") && fs::exists(j["tokenizer"].get<std::string>()))
      p = j["tokenizer"].get<std::string>();
  }
  return p;
}

bool non_empty_file(const std::string& p) {
  return fs::exists(p) && fs::file_size(p) > 0;
}

uint64_t seed_of(const Recipe& r, const Stage& s) {
  return s.seed() ? s.seed() : r.seed();
}

}  // namespace

void validate_post_stage(const LoadedRecipe& lr, int i) {
  const Recipe& r = lr.recipe();
  const Stage& s = r.stage(i);
  const StageKind k = s.kind();
  PostChecker c{lr, i};
  const std::string kind = StageKind_Name(k);

  // Option messages belong to their kind.
  if (s.has_post_data() && k != POST_DATA) c.error("post_data", "only POST_DATA stages take it");
  if (s.has_sft() && k != SFT) c.error("sft", "only SFT stages take it");
  if (s.has_reward_model() && k != REWARD_MODEL)
    c.error("reward_model", "only REWARD_MODEL stages take it");
  if (s.has_rejection_sampling() && k != REJECTION_SAMPLING)
    c.error("rejection_sampling", "only REJECTION_SAMPLING stages take it");
  if (s.has_dpo() && k != DPO) c.error("dpo", "only DPO stages take it");
  if (s.round() < 0) c.error("round", "must be >= 0 (got {})", s.round());
  if (!s.data_dir().empty())
    c.error("data_dir", "post-training stages read data_from (a POST_DATA stage)");
  const Layout L = layout_of(s);
  if (L.world() != 1)
    c.error("parallel", "post-training stages run single-process (layout needs {} ranks)",
            L.world());

  if (k == POST_DATA) {
    if (!s.init_from().empty()) c.error("init_from", "a POST_DATA stage takes no model");
    if (!s.reward_model_from().empty())
      c.error("reward_model_from", "a POST_DATA stage takes no reward model");
    if (s.samples_from_size()) c.error("samples_from", "a POST_DATA stage takes no samples");
    if (!s.data_from().empty()) {
      const int j = c.earlier("data_from", s.data_from());
      if (r.stage(j).kind() != DATA)
        c.error("data_from", "stage '{}' is a {} stage, not DATA (its tokenizer is used)",
                s.data_from(), StageKind_Name(r.stage(j).kind()));
      if (s.post_data().bpe_vocab() != 0)
        c.error("post_data.bpe_vocab", "the tokenizer comes from data_from '{}'; drop bpe_vocab",
                s.data_from());
    }
    const auto& d = s.post_data();
    if (d.sft_dialogs() < 0 || d.prefs() < 0 || d.prompts() < 0 || d.eval_prompts() < 0)
      c.error("post_data", "counts must be >= 0");
    if (d.bpe_vocab() != 0 && d.bpe_vocab() < 300)
      c.error("post_data.bpe_vocab", "{} is below 300 (256 byte tokens + merges)", d.bpe_vocab());
    return;
  }

  // Inputs.
  if (s.data_from().empty())
    c.error("data_from", "a {} stage needs data_from: a POST_DATA stage", kind);
  {
    const int j = c.earlier("data_from", s.data_from());
    if (r.stage(j).kind() != POST_DATA)
      c.error("data_from", "stage '{}' is a {} stage, not POST_DATA", s.data_from(),
              StageKind_Name(r.stage(j).kind()));
  }
  if (!s.init_from().empty()) {
    const int j = c.earlier("init_from", s.init_from());
    if (!makes_model(r.stage(j).kind()))
      c.error("init_from", "stage '{}' is a {} stage and produces no model", s.init_from(),
              StageKind_Name(r.stage(j).kind()));
    if (!s.model().flavour().empty())
      c.error("model.flavour", "the model comes from init_from '{}'; drop the flavour",
              s.init_from());
  } else {
    if (s.model().flavour().empty())
      c.error("init_from",
              "a {} stage starts from init_from (an earlier model) or a fresh model.flavour", kind);
    try {
      text::llama3_flavour(s.model().flavour());
    } catch (const Error& e) {
      c.error("model.flavour", "{}", e.what());
    }
  }
  if (s.model().dim() || s.model().n_layers() || s.model().n_heads() || s.model().n_kv_heads() ||
      s.model().vocab_size() || s.model().rope_theta() != 0 || !s.model().precision().empty())
    c.error("model",
            "post-training stages take the model's shape from init_from or the flavour "
            "(vocabulary: the "
            "tokenizer); only model.flavour is read");
  if (!s.reward_model_from().empty()) {
    if (k == SFT) c.error("reward_model_from", "a {} stage uses no reward model", kind);
    if (k == REWARD_MODEL && s.common_eval_samples_from_size() == 0)
      c.error("reward_model_from",
              "a REWARD_MODEL stage takes an earlier RM only to compare with it on the common "
              "held-out set; set common_eval_samples_from");
    const int j = c.earlier("reward_model_from", s.reward_model_from());
    if (!is_reward_model(r, lr, j))
      c.error("reward_model_from",
              "stage '{}' is a {} stage, not REWARD_MODEL (or an AVERAGE of them)",
              s.reward_model_from(), StageKind_Name(r.stage(j).kind()));
  }
  for (int n = 0; n < s.samples_from_size(); ++n) {
    const std::string f = fmt::format("samples_from[{}]", n);
    if (k == REJECTION_SAMPLING) c.error(f, "a REJECTION_SAMPLING stage samples its own data");
    const int j = c.earlier(f, s.samples_from(n));
    if (r.stage(j).kind() != REJECTION_SAMPLING)
      c.error(f, "stage '{}' is a {} stage, not REJECTION_SAMPLING", s.samples_from(n),
              StageKind_Name(r.stage(j).kind()));
    // Training on samples of the held-out prompts would leak them into every later evaluation.
    if (r.stage(j).rejection_sampling().held_out())
      c.error(f,
              "stage '{}' samples the held-out prompts (held_out: true); only eval_samples_from "
              "may read it",
              s.samples_from(n));
  }
  auto held_out_refs = [&](const char* field, const auto& refs) {
    for (int n = 0; n < refs.size(); ++n) {
      const std::string f = fmt::format("{}[{}]", field, n);
      if (k != REWARD_MODEL) c.error(f, "only REWARD_MODEL stages evaluate on held-out samples");
      const int j = c.earlier(f, refs[n]);
      if (r.stage(j).kind() != REJECTION_SAMPLING || !r.stage(j).rejection_sampling().held_out())
        c.error(f, "stage '{}' is not a REJECTION_SAMPLING stage with held_out: true", refs[n]);
    }
  };
  held_out_refs("eval_samples_from", s.eval_samples_from());
  held_out_refs("common_eval_samples_from", s.common_eval_samples_from());
  if (k == REJECTION_SAMPLING && s.rejection_sampling().held_out() &&
      s.rejection_sampling().dialog_prompts() > 0)
    c.error("rejection_sampling.dialog_prompts",
            "a held_out stage samples the held-out prompts, not the dialogs'");
  if (k == REJECTION_SAMPLING && s.rejection_sampling().dialog_prompts() < 0)
    c.error("rejection_sampling.dialog_prompts", "must be >= 0 (got {})",
            s.rejection_sampling().dialog_prompts());
  if (k == REJECTION_SAMPLING && s.rejection_sampling().held_out() &&
      s.rejection_sampling().require_correct())
    c.error("rejection_sampling.require_correct",
            "a held_out stage only annotates (its samples train nothing)");
  if (k == REJECTION_SAMPLING && s.rejection_sampling().rank_wrong_pairs() &&
      s.reward_model_from().empty())
    c.error("rejection_sampling.rank_wrong_pairs", "needs reward_model_from (the RM that ranks)");

  // Optimisation (the sampling stage trains nothing).
  const auto& o = s.optimizer();
  if (k != REJECTION_SAMPLING) {
    if (!(o.lr() > 0)) c.error("optimizer.lr", "must be > 0 (got {})", o.lr());
    if (o.weight_decay() < 0)
      c.error("optimizer.weight_decay", "must be >= 0 (got {})", o.weight_decay());
    if (o.max_grad_norm() < 0)
      c.error("optimizer.max_grad_norm", "must be >= 0 (got {})", o.max_grad_norm());
  } else if (s.has_optimizer()) {
    c.error("optimizer", "a REJECTION_SAMPLING stage trains nothing");
  }
  const std::pair<const char*, bool> foreign[] = {{"lr", s.has_lr()},
                                                  {"batch", s.has_batch()},
                                                  {"total_tokens", s.total_tokens() != 0},
                                                  {"mix", s.mix_size() > 0},
                                                  {"long_context", s.has_long_context()},
                                                  {"anneal", s.has_anneal()},
                                                  {"average", s.has_average()},
                                                  {"data", s.has_data()},
                                                  {"synthetic_niah", s.has_synthetic_niah()},
                                                  {"eval", s.has_eval()}};
  for (auto& [f, set] : foreign)
    if (set)
      c.error(f,
              "a {} stage takes its budget from its own options (sft, reward_model, "
              "rejection_sampling, dpo)",
              kind);
  auto non_negative = [&](const std::string& f, double v) {
    if (v < 0) c.error(f, "must be >= 0 (got {})", v);
  };
  if (k == SFT) {
    const auto& p = s.sft();
    non_negative("sft.steps", double(p.steps()));
    non_negative("sft.batch", double(p.batch()));
    non_negative("sft.warmup_steps", double(p.warmup_steps()));
    non_negative("sft.max_new_tokens", double(p.max_new_tokens()));
    if (p.seq_len() != 0 && p.seq_len() < 16) c.error("sft.seq_len", "{} is below 16", p.seq_len());
    if (p.only_samples() && s.samples_from_size() == 0)
      c.error("sft.only_samples", "needs samples_from (REJECTION_SAMPLING stages)");
  } else if (k == REWARD_MODEL) {
    non_negative("reward_model.steps", double(s.reward_model().steps()));
    non_negative("reward_model.batch", double(s.reward_model().batch()));
    non_negative("reward_model.warmup_steps", double(s.reward_model().warmup_steps()));
    const double fr = s.reward_model().samples_fraction();
    if (fr < 0 || fr >= 1) c.error("reward_model.samples_fraction", "{} must lie in [0, 1)", fr);
    if (fr > 0 && s.samples_from_size() == 0)
      c.error("reward_model.samples_fraction", "needs samples_from (REJECTION_SAMPLING stages)");
  } else if (k == REJECTION_SAMPLING) {
    const auto& p = s.rejection_sampling();
    non_negative("rejection_sampling.k", double(p.k()));
    non_negative("rejection_sampling.temperature", p.temperature());
    non_negative("rejection_sampling.top_k", double(p.top_k()));
    non_negative("rejection_sampling.max_new_tokens", double(p.max_new_tokens()));
    if (p.top_p() < 0 || p.top_p() > 1)
      c.error("rejection_sampling.top_p", "{} must lie in [0, 1]", p.top_p());
    if (!p.has_min_score() && p.min_score() != 0)
      c.error("rejection_sampling.min_score", "set has_min_score: true to use it");
  } else if (k == DPO) {
    const auto& p = s.dpo();
    non_negative("dpo.steps", double(p.steps()));
    non_negative("dpo.batch", double(p.batch()));
    non_negative("dpo.beta", p.beta());
    non_negative("dpo.warmup_steps", double(p.warmup_steps()));
    non_negative("dpo.max_new_tokens", double(p.max_new_tokens()));
    if (p.only_samples() && s.samples_from_size() == 0)
      c.error("dpo.only_samples", "needs samples_from (REJECTION_SAMPLING stages)");
    non_negative("dpo.win_rate_samples", double(p.win_rate_samples()));
    if (p.win_rate_samples() > 0 && s.reward_model_from().empty())
      c.error("dpo.win_rate_samples", "{} needs reward_model_from (the RM that judges)",
              p.win_rate_samples());
  }
}

std::vector<std::string> post_stage_inputs(const Stage& s) {
  std::vector<std::string> v;
  if (!is_post_kind(s.kind())) return v;
  if (!s.reward_model_from().empty()) v.push_back(s.reward_model_from());
  for (auto& n : s.samples_from()) v.push_back(n);
  for (auto& n : s.eval_samples_from()) v.push_back(n);
  for (auto& n : s.common_eval_samples_from()) v.push_back(n);
  return v;
}

json run_post_stage(const LoadedRecipe& lr, int index, const std::string& run_dir, bool quiet) {
  const Recipe& r = lr.recipe();
  const Stage& s = r.stage(index);
  const std::string dir = (fs::path(run_dir) / s.name()).string();
  // Post stages are short and not resumable mid-way: an interrupted one starts over.
  fs::remove_all(dir);
  fs::create_directories(dir);
  const uint64_t seed = seed_of(r, s);
  auto stage_dir = [&](const std::string& n) { return (fs::path(run_dir) / n).string(); };

  if (s.kind() == POST_DATA) {
    post::DefaultDataOptions o;
    o.out_dir = dir;
    const auto& d = s.post_data();
    o.n_train = or_default(d.sft_dialogs(), o.n_train);
    o.n_pref = or_default(d.prefs(), o.n_pref);
    o.n_prompts = or_default(d.prompts(), o.n_prompts);
    o.n_eval = or_default(d.eval_prompts(), o.n_eval);
    o.bpe_vocab = or_default(d.bpe_vocab(), o.bpe_vocab);
    o.seed = seed;
    if (!s.data_from().empty()) {
      o.tokenizer = tokenizer_of_data_stage(stage_dir(s.data_from()));
      // The chat format needs these specials; a tokenizer without them cannot render dialogs.
      auto tok = text::Tokenizer::load(o.tokenizer);
      for (const char* sp : {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>", "<|eom_id|>"})
        tok.special_id(sp);
    }
    json f = post::make_default_data(o).metrics;
    if (s.round()) f["round"] = s.round();
    return f;
  }

  const std::string data = stage_dir(s.data_from());
  post::ModelSource src;
  src.tokenizer = data + "/tokenizer.model";
  if (!s.init_from().empty()) {
    src.dir = stage_dir(s.init_from()) + "/model";
  } else {
    src.flavour = s.model().flavour();
    src.seed = seed;
  }
  post::TrainLoopOptions t;
  t.lr = float(s.optimizer().lr());
  t.weight_decay = float(s.optimizer().weight_decay());
  t.max_grad_norm = float(s.optimizer().max_grad_norm() > 0 ? s.optimizer().max_grad_norm() : 1.0);
  t.log_every = quiet ? 0 : 25;
  const std::string name = s.name();
  t.on_step = [dir, name](int64_t step, double loss, float lr) {
    write_metrics(dir, name, step, {{"loss", loss}, {"lr", lr}});
  };
  auto samples = [&](const char* file) {
    std::vector<std::string> v;
    for (auto& n : s.samples_from()) {
      const std::string p = stage_dir(n) + "/" + file;
      if (non_empty_file(p))
        v.push_back(p);
      else
        spdlog::warn("stage {}: {} is empty (no samples of that kind from stage {})", name, p, n);
    }
    return v;
  };

  json f;
  int64_t steps = 0;
  switch (s.kind()) {
    case SFT: {
      const auto& p = s.sft();
      post::SftOptions o;
      o.model = src;
      if (!p.only_samples()) o.data.push_back(data + "/sft.jsonl");
      for (auto& x : samples("sft.jsonl")) o.data.push_back(x);
      LLAMA3_CHECK(!o.data.empty(),
                   "stage '{}': no SFT data (samples_from produced no kept samples)", name);
      o.eval_prompts = data + "/eval.jsonl";
      o.out_dir = dir + "/model";
      o.steps = steps = or_default(p.steps(), o.steps);
      o.batch = or_default(p.batch(), o.batch);
      o.seq = or_default(p.seq_len(), o.seq);
      o.max_new_tokens = or_default(p.max_new_tokens(), o.max_new_tokens);
      o.train_on_termination = !p.no_termination_target();
      if (s.init_from().empty()) src.max_seq_len = o.seq, o.model = src;
      o.train = t;
      o.train.warmup = or_default(p.warmup_steps(), o.train.warmup);
      o.seed = seed;
      f = post::run_sft(o).metrics;
      break;
    }
    case REWARD_MODEL: {
      const auto& p = s.reward_model();
      post::RewardOptions o;
      o.model = src;
      o.prefs = {data + "/prefs.jsonl"};
      o.on_policy_prefs = samples("verified_prefs.jsonl");
      o.on_policy_fraction = p.samples_fraction();
      o.balance_responses = p.balance_responses();
      o.eval_prefs = data + "/eval_prefs.jsonl";
      for (auto& n : s.eval_samples_from())
        if (non_empty_file(stage_dir(n) + "/verified_prefs.jsonl"))
          o.eval_on_policy.push_back(stage_dir(n) + "/verified_prefs.jsonl");
      // Even an empty annotation names the common set (then the generated pairs alone).
      for (auto& n : s.common_eval_samples_from())
        o.common_eval_on_policy.push_back(stage_dir(n) + "/verified_prefs.jsonl");
      if (!s.reward_model_from().empty())
        o.compare_with = stage_dir(s.reward_model_from()) + "/model";
      o.out_dir = dir + "/model";
      o.pairs_path = dir + "/eval_pairs.jsonl";
      o.steps = steps = or_default(p.steps(), o.steps);
      o.batch = or_default(p.batch(), o.batch);
      o.train = t;
      o.train.warmup = or_default(p.warmup_steps(), o.train.warmup);
      o.seed = seed;
      f = post::run_reward_model(o).metrics;
      break;
    }
    case REJECTION_SAMPLING: {
      const auto& p = s.rejection_sampling();
      post::RejectionOptions o;
      o.policy = src;
      if (!s.reward_model_from().empty()) {
        o.reward_model = stage_dir(s.reward_model_from()) + "/model";
        o.reward_model_tokenizer = src.tokenizer;
      }
      o.prompts = data + (p.held_out()             ? "/eval.jsonl"
                          : p.dialog_prompts() > 0 ? "/sft.jsonl"
                                                   : "/prompts.jsonl");
      o.max_prompts = p.dialog_prompts();
      o.out_dir = dir;
      o.k = or_default(p.k(), o.k);
      if (p.has_min_score()) o.min_score = p.min_score();
      o.rank_wrong_pairs = p.rank_wrong_pairs();
      o.require_correct = p.require_correct();
      o.sampling.temperature = float(or_default(p.temperature(), double(o.sampling.temperature)));
      o.sampling.top_p = float(or_default(p.top_p(), double(o.sampling.top_p)));
      o.sampling.top_k = p.top_k();
      o.sampling.max_new_tokens = or_default(p.max_new_tokens(), o.sampling.max_new_tokens);
      // Two sampling stages of one policy (a round's annotation and its rejection sampling)
      // must not draw the same samples: the stage's name joins the seed. Its position did
      // before, so inserting a stage re-drew every sampler after it (docs/recipes.md).
      o.sampling.seed = llama3::data::hash64(name, seed);
      f = post::run_rejection_sampling(o).metrics;
      if (p.held_out()) f["held_out"] = true;
      break;
    }
    case DPO: {
      const auto& p = s.dpo();
      post::DpoOptions o;
      o.model = src;
      if (!p.only_samples()) o.prefs.push_back(data + "/prefs.jsonl");
      for (auto& x : samples("verified_prefs.jsonl")) o.prefs.push_back(x);
      // The RM-ranked wrong-vs-wrong pairs of annotations with rank_wrong_pairs.
      for (auto& n : s.samples_from())
        if (non_empty_file(stage_dir(n) + "/ranked_prefs.jsonl"))
          o.prefs.push_back(stage_dir(n) + "/ranked_prefs.jsonl");
      LLAMA3_CHECK(!o.prefs.empty(),
                   "stage '{}': no DPO pairs (samples_from produced no verified pairs)", name);
      o.eval_prefs = data + "/eval_prefs.jsonl";
      if (!s.reward_model_from().empty()) {
        o.reward_model = stage_dir(s.reward_model_from()) + "/model";
        o.reward_model_tokenizer = src.tokenizer;
      }
      o.eval_prompts = data + "/eval.jsonl";
      o.out_dir = dir + "/model";
      o.judged_path = dir + "/win_rate.jsonl";
      o.win_rate_samples = p.win_rate_samples();
      o.beta = float(or_default(p.beta(), double(o.beta)));
      o.alpha = p.alpha() < 0 ? 0.f : float(or_default(p.alpha(), double(o.alpha)));
      o.steps = steps = or_default(p.steps(), int64_t(60));
      o.batch = or_default(p.batch(), o.batch);
      o.max_new_tokens = or_default(p.max_new_tokens(), o.max_new_tokens);
      o.train = t;
      o.train.warmup = or_default(p.warmup_steps(), o.train.warmup);
      o.seed = seed;
      f = post::run_dpo(o).metrics;
      break;
    }
    default:
      fail("stage '{}': {} is not a post-training kind", name, StageKind_Name(s.kind()));
  }
  // The stage's evaluation as the last metrics line (numbers only, like the step lines).
  json last = json::object();
  for (auto& [key, v] : f.items())
    if (v.is_number()) last[key] = v;
  write_metrics(dir, name, steps, last);
  if (s.round()) f["round"] = s.round();
  return f;
}

PostPlan plan_post_stage(const LoadedRecipe& lr, int index, const text::LlamaConfig* init) {
  const Recipe& r = lr.recipe();
  const Stage& s = r.stage(index);
  PostPlan p;
  const std::string rnd = s.round() ? fmt::format("round {}: ", s.round()) : "";
  if (s.kind() == POST_DATA) {
    const auto& d = s.post_data();
    p.notes = fmt::format(
        "{}generated tasks: {} dialogs, {} preference prompts, {} RS prompts, {} held out; "
        "tokenizer {}",
        rnd, or_default(d.sft_dialogs(), int64_t(600)), or_default(d.prefs(), int64_t(600)),
        or_default(d.prompts(), int64_t(100)), or_default(d.eval_prompts(), int64_t(60)),
        s.data_from().empty() ? "trained (BPE)" : "of stage " + s.data_from());
    return p;
  }
  if (init) {
    p.config = *init;
  } else if (s.init_from().empty() && !s.model().flavour().empty()) {
    p.config = text::llama3_flavour(s.model().flavour());
  }
  // RS prompts: the POST_DATA stage's count.
  int64_t prompts = 100, eval = 60;
  const int di = lr.stage_index(s.data_from());
  if (di >= 0) {
    prompts = or_default(r.stage(di).post_data().prompts(), prompts);
    eval = or_default(r.stage(di).post_data().eval_prompts(), eval);
  }
  constexpr int64_t kPairLen = 48;  // typical rendered prompt + response of the default tasks
  double train_tokens = 0, gen_tokens = 0;
  int64_t seq = kPairLen;
  switch (s.kind()) {
    case SFT: {
      const int64_t steps = or_default(s.sft().steps(), int64_t(200)),
                    b = or_default(s.sft().batch(), int64_t(8));
      seq = or_default(s.sft().seq_len(), int64_t(128));
      train_tokens = double(steps * b * seq);
      gen_tokens = double(eval * or_default(s.sft().max_new_tokens(), int64_t(24)));
      std::string from;
      for (auto& n : s.samples_from()) from += (from.empty() ? ", + samples of " : ", ") + n;
      p.notes = fmt::format("{}{} steps x {} rows x {} (assistant tokens only){}", rnd, steps, b,
                            seq, from);
      break;
    }
    case REWARD_MODEL: {
      const int64_t steps = or_default(s.reward_model().steps(), int64_t(100)),
                    b = or_default(s.reward_model().batch(), int64_t(8));
      train_tokens = double(steps * 2 * b * kPairLen);
      p.notes = fmt::format("{}{} steps x {} pairs, pairwise loss", rnd, steps, b);
      break;
    }
    case REJECTION_SAMPLING: {
      const int64_t k = or_default(s.rejection_sampling().k(), int64_t(8));
      const bool held = s.rejection_sampling().held_out();
      const int64_t dialogs = s.rejection_sampling().dialog_prompts();
      if (held) prompts = eval;
      if (dialogs > 0) prompts = dialogs;
      gen_tokens =
          double(prompts * k * or_default(s.rejection_sampling().max_new_tokens(), int64_t(24)));
      p.notes = fmt::format("{}{} {}prompts x K={} samples of {}, {}", rnd, prompts,
                            held          ? "held-out "
                            : dialogs > 0 ? "SFT-dialog "
                                          : "",
                            k, s.init_from().empty() ? "a fresh model" : s.init_from(),
                            s.reward_model_from().empty()
                                ? "labelled by the verifier only (no reward model)"
                                : "scored by " + s.reward_model_from());
      p.config.reset();  // produces data, not a model
      if (init) p.flops = gen_tokens * init->flops_per_token(kPairLen) / 3.0;
      p.tokens = gen_tokens;
      return p;
    }
    case DPO: {
      const int64_t steps = or_default(s.dpo().steps(), int64_t(60)),
                    b = or_default(s.dpo().batch(), int64_t(8));
      train_tokens = double(steps * 2 * b * kPairLen);
      gen_tokens = double(2 * eval * or_default(s.dpo().max_new_tokens(), int64_t(24)));
      p.notes = fmt::format("{}{} steps x {} pairs, beta {}, alpha {}", rnd, steps, b,
                            or_default(s.dpo().beta(), 0.1),
                            s.dpo().alpha() < 0 ? 0.0 : or_default(s.dpo().alpha(), 0.2));
      break;
    }
    default:
      break;
  }
  p.tokens = train_tokens;
  if (p.config)
    p.flops = train_tokens * p.config->flops_per_token(seq) +
              gen_tokens * p.config->flops_per_token(seq) / 3.0;
  return p;
}

namespace {

// The post-training kind an AVERAGE stage stands for: its inputs' kind when every input is a
// post-training model of one kind (an AVERAGE of such averages counts as that kind too);
// else KIND_UNSPECIFIED (not a post model).
StageKind averaged_kind(const LoadedRecipe& lr, int i) {
  const Stage& s = lr.recipe().stage(i);
  if (s.kind() != AVERAGE) return post_produces_model(s.kind()) ? s.kind() : KIND_UNSPECIFIED;
  if (s.average().stages_size() == 0 || s.average().checkpoints_size() > 0) return KIND_UNSPECIFIED;
  StageKind k = KIND_UNSPECIFIED;
  for (auto& n : s.average().stages()) {
    const int j = lr.stage_index(n);
    if (j < 0 || j >= i) return KIND_UNSPECIFIED;
    const StageKind kj = averaged_kind(lr, j);
    if (kj == KIND_UNSPECIFIED || (k != KIND_UNSPECIFIED && kj != k)) return KIND_UNSPECIFIED;
    k = kj;
  }
  return k;
}

// The POST_DATA stage behind a post model (following AVERAGE inputs); empty if none.
std::string post_data_of(const LoadedRecipe& lr, int i) {
  const Stage& s = lr.recipe().stage(i);
  if (s.kind() != AVERAGE) return s.data_from();
  for (auto& n : s.average().stages()) {
    const int j = lr.stage_index(n);
    if (j >= 0 && j < i) return post_data_of(lr, j);
  }
  return "";
}

// The first trained (non-AVERAGE) stage behind an AVERAGE, following nested averages: where
// an average's evaluation takes the inputs' reference policy, reward model and held-out samples.
int first_trained_input(const LoadedRecipe& lr, int i) {
  const Stage& s = lr.recipe().stage(i);
  if (s.kind() != AVERAGE) return i;
  for (auto& n : s.average().stages()) {
    const int j = lr.stage_index(n);
    if (j >= 0 && j < i) return first_trained_input(lr, j);
  }
  return -1;
}

int64_t max_new_tokens_of(const LoadedRecipe& lr, int i) {
  const Stage& s = lr.recipe().stage(i);
  if (s.kind() == SFT) return or_default(s.sft().max_new_tokens(), int64_t(24));
  if (s.kind() == DPO) return or_default(s.dpo().max_new_tokens(), int64_t(24));
  if (s.kind() == AVERAGE && s.average().stages_size()) {
    const int j = lr.stage_index(s.average().stages(0));
    if (j >= 0 && j < i) return max_new_tokens_of(lr, j);
  }
  return 24;
}

}  // namespace

json evaluate_post_average(const LoadedRecipe& lr, int index, const std::string& run_dir) {
  const StageKind k = averaged_kind(lr, index);
  const std::string data = post_data_of(lr, index);
  if (lr.recipe().stage(index).kind() != AVERAGE || k == KIND_UNSPECIFIED || data.empty())
    return json::object();
  const std::string dd = (fs::path(run_dir) / data).string();
  post::ModelSource src;
  src.dir = (fs::path(run_dir) / lr.recipe().stage(index).name() / "model").string();
  src.tokenizer = dd + "/tokenizer.model";
  const int first = first_trained_input(lr, index);
  const Stage* in = first >= 0 ? &lr.recipe().stage(first) : nullptr;
  auto stage_dir = [&](const std::string& n) { return (fs::path(run_dir) / n).string(); };
  json f;
  if (k == REWARD_MODEL) {
    // The inputs' held-out on-policy samples too, so the average is judged like its inputs.
    std::vector<std::string> onp, common;
    auto files = [&](const auto& refs, std::vector<std::string>& to) {
      for (auto& n : refs)
        if (non_empty_file(stage_dir(n) + "/verified_prefs.jsonl"))
          to.push_back(stage_dir(n) + "/verified_prefs.jsonl");
    };
    if (in) {
      files(in->eval_samples_from(), onp);
      for (auto& n : in->common_eval_samples_from())
        common.push_back(stage_dir(n) + "/verified_prefs.jsonl");
    }
    const std::string cmp =
        in && !in->reward_model_from().empty() ? stage_dir(in->reward_model_from()) + "/model" : "";
    const std::string rows = stage_dir(lr.recipe().stage(index).name()) + "/eval_pairs.jsonl";
    f = post::evaluate_reward_model(src, dd + "/eval_prefs.jsonl", onp, common, cmp, rows);
  } else if (k == DPO && in && !in->init_from().empty()) {
    // Against the policy the DPO runs started from (reference log-probs and the win-rate
    // opponent), judged by their reward model, with the first input's beta.
    post::DpoEvalOptions o;
    o.model = src;
    o.reference = {.dir = stage_dir(in->init_from()) + "/model", .tokenizer = src.tokenizer};
    o.eval_prefs = dd + "/eval_prefs.jsonl";
    o.eval_prompts = dd + "/eval.jsonl";
    if (!in->reward_model_from().empty()) {
      o.reward_model = stage_dir(in->reward_model_from()) + "/model";
      o.reward_model_tokenizer = src.tokenizer;
    }
    o.beta = float(or_default(in->dpo().beta(), double(o.beta)));
    o.win_rate_samples = in->dpo().win_rate_samples();
    o.max_new_tokens = max_new_tokens_of(lr, index);
    o.judged_path = stage_dir(lr.recipe().stage(index).name()) + "/win_rate.jsonl";
    f = post::evaluate_dpo(o);
  } else {
    f = post::evaluate_policy(src, dd + "/eval.jsonl", max_new_tokens_of(lr, index));
  }
  f["average_of"] = StageKind_Name(k);
  if (lr.recipe().stage(index).round()) f["round"] = lr.recipe().stage(index).round();
  return f;
}

namespace {

// "p ± h": h the half-width of the normal-approximation 95% interval of a proportion p
// measured on n items (1.96 sqrt(p (1 - p) / n)), so a stage-to-stage difference can be judged
// against the noise of the eval set's size.
std::string with_interval(const json& f, const char* key, const char* n_key) {
  if (!f.contains(key) || !f[key].is_number()) return "-";
  const double p = f[key].get<double>();
  if (!f.contains(n_key) || !f[n_key].is_number() || f[n_key].get<double>() <= 0)
    return fmt::format("{:.3f}", p);
  const double n = f[n_key].get<double>();
  return fmt::format("{:.3f} ± {:.3f}", p, 1.96 * std::sqrt(std::max(0.0, p * (1 - p)) / n));
}

// DPO's exact match minus its starting policy's, on the same prompts, with the 95% interval of
// that paired difference (per prompt +1 fixed, -1 broken, 0 unchanged), which is much tighter
// than the two proportions' intervals side by side; fixed / broken in brackets.
// The same for a reward model against the earlier one it was compared with on the common
// held-out pairs (keys common_fixed / common_broken / eval_pairs_common).
std::string paired_gain(const json& f, const char* fixed_key = "exact_match_fixed",
                        const char* broken_key = "exact_match_broken",
                        const char* n_key = "eval_prompts") {
  if (!f.contains(fixed_key) || !f.contains(broken_key) || !f.contains(n_key)) return "-";
  const double fx = f[fixed_key].get<double>(), br = f[broken_key].get<double>(),
               n = f[n_key].get<double>();
  if (n <= 0) return "-";
  const double d = (fx - br) / n, var = std::max(0.0, (fx + br) / n - d * d);
  return fmt::format("{:+.3f} ± {:.3f} ({}/{})", d, 1.96 * std::sqrt(var / n), int64_t(fx),
                     int64_t(br));
}

// The verifier's best-of-K gain with its interval when the stage recorded one.
std::string gain(const json& f) {
  if (!f.contains("verified_best_of_k_gain") || !f["verified_best_of_k_gain"].is_number())
    return "-";
  const double g = f["verified_best_of_k_gain"].get<double>();
  if (!f.contains("verified_best_of_k_gain_h")) return fmt::format("{:+.3f}", g);
  return fmt::format("{:+.3f} ± {:.3f}", g, f["verified_best_of_k_gain_h"].get<double>());
}

// The win rate (ties count half) with the 95% interval of its three-valued per-prompt outcome
// (1, 1/2, 0): the sample variance w + t/4 - p^2 per prompt, not p(1-p), which would treat
// every tie as a coin flip. Older runs without the counts get the proportion's interval.
std::string win_rate(const json& f) {
  if (!f.contains("win_rate_wins") || !f.contains("win_rate_ties") ||
      !f.contains("win_rate_losses"))
    return with_interval(f, "win_rate_vs_start", "eval_prompts");
  const double w = f["win_rate_wins"].get<double>(), t = f["win_rate_ties"].get<double>(),
               l = f["win_rate_losses"].get<double>(), n = w + t + l;
  if (n <= 0) return "-";
  const double p = (w + 0.5 * t) / n, var = std::max(0.0, (w + 0.25 * t) / n - p * p);
  std::string judge;
  if (f.contains("judge_agrees_with_verifier") && f.contains("judge_disagrees_with_verifier"))
    judge = fmt::format("; RM sides with the verifier {}/{}",
                        f["judge_agrees_with_verifier"].get<int64_t>(),
                        f["judge_agrees_with_verifier"].get<int64_t>() +
                            f["judge_disagrees_with_verifier"].get<int64_t>());
  return fmt::format("{:.3f} ± {:.3f} ({}/{}/{}{})", p, 1.96 * std::sqrt(var / n), int64_t(w),
                     int64_t(t), int64_t(l), judge);
}

// The sampled win rate with its interval (from the per-prompt mean outcome) and K.
std::string sampled_win_rate(const json& f) {
  if (!f.contains("win_rate_sampled") || !f.contains("win_rate_sampled_h")) return "-";
  return fmt::format(
      "{:.3f} ± {:.3f} (K {}: {}/{}/{})", f["win_rate_sampled"].get<double>(),
      f["win_rate_sampled_h"].get<double>(), f.value("win_rate_sampled_k", int64_t(0)),
      f.value("win_rate_sampled_wins", int64_t(0)), f.value("win_rate_sampled_ties", int64_t(0)),
      f.value("win_rate_sampled_losses", int64_t(0)));
}

}  // namespace

std::string post_rounds_markdown(const std::string& run_dir) {
  const std::string rpath = run_dir + "/recipe.textproto";
  if (!fs::exists(rpath)) return "";
  LoadedRecipe lr;
  try {
    lr = LoadedRecipe::load(rpath);
  } catch (const Error&) {
    return "";  // a recipe from another build; the main table still shows every stage
  }
  // round -> kind -> final metrics of the round's last stage of that kind (an AVERAGE of RMs
  // or of SFT policies counts as that kind: it is what the round goes on with; for sampling:
  // the one the round's SFT trains on, else the last one scored by a reward model, not an
  // annotation).
  std::map<int, std::map<StageKind, json>> rounds;
  std::map<int, std::vector<std::string>> names;
  std::vector<int> averages;
  auto final_of = [&](const std::string& name) {
    const std::string p = run_dir + "/" + name + "/final.json";
    return fs::exists(p) ? io::read_json(p) : json::object();
  };
  const auto& stages = lr.recipe().stage();
  // The round's rejection sampling: the one its SFT trains on, else its last one scored by an
  // RM, else its first. Annotations (sampling stages too, some scored by an RM only to rank
  // their pairs) do not stand for it.
  std::set<std::string> sft_samples;
  for (const Stage& s : stages)
    if (s.kind() == SFT)
      for (auto& n : s.samples_from()) sft_samples.insert(n);
  std::map<int, const Stage*> round_rs;
  for (const Stage& s : stages) {
    if (s.kind() != REJECTION_SAMPLING || s.rejection_sampling().held_out()) continue;
    const Stage*& cur = round_rs[s.round()];
    if (cur && sft_samples.count(cur->name())) continue;
    if (!cur || sft_samples.count(s.name()) || !s.reward_model_from().empty()) cur = &s;
  }
  for (int i = 0; i < stages.size(); ++i) {
    const Stage& s = stages[i];
    StageKind k = s.kind();
    if (k == AVERAGE) {
      k = averaged_kind(lr, i);
      if (k == KIND_UNSPECIFIED) continue;
      averages.push_back(i);
      names[s.round()].push_back(s.name());
    } else {
      if (!is_post_kind(k) || k == POST_DATA) continue;
      names[s.round()].push_back(s.name());
    }
    if (k == REJECTION_SAMPLING && round_rs[s.round()] != &s) continue;
    rounds[s.round()][k] = final_of(s.name());
  }
  // The round's reward model is the one its rejection sampling scored with (when that is in the
  // round): an AVERAGE that followed it but was not used does not stand for the round.
  for (auto& [round, rs] : round_rs) {
    const int j = lr.stage_index(rs->reward_model_from());
    if (!rs->reward_model_from().empty() && j >= 0 && stages[j].round() == round)
      rounds[round][REWARD_MODEL] = final_of(rs->reward_model_from());
  }
  if (rounds.empty()) return "";
  auto num = [](const json& f, const char* k) -> std::string {
    if (!f.contains(k) || !f[k].is_number()) return "-";
    return fmt::format("{:.3f}", f[k].get<double>());
  };
  std::string md =
      "\n## Post-training rounds\n\n"
      "RM acc: the reward model's held-out pairwise accuracy over the generated held-out pairs "
      "plus, "
      "where the recipe annotates held-out prompts (eval_samples_from), the current policy's own "
      "correct-vs-wrong samples on them; RM acc (own samples): that second part alone (a later "
      "round's policy is stronger and its wrong samples are harder, so these two columns do not "
      "compare rounds). RM acc (common set): the RM on held-out pairs no RM trains on (the "
      "generated ones plus the held-out samples of the policies named in "
      "common_eval_samples_from: in the default, round 1's policy for round 1, rounds 1 and 2's "
      "for round 2); RM gain (common set): that accuracy minus the previous RM's "
      "(reward_model_from) on the same pairs, paired per pair (pairs fixed / broken), with the "
      "interval of that paired difference. RS: "
      "acceptance; best-of-K gain as the verifier sees it (the RM's pick among the K samples is "
      "correct minus a random sample is correct: negative when the RM prefers wrong answers) and "
      "in the RM's own score (mean best - mean, >= 0 by construction); RM pick / sample correct. "
      "SFT EM and DPO EM: greedy exact match on held-out prompts. DPO EM gain: DPO EM minus its "
      "SFT model's on the same prompts (answers fixed / broken in brackets), with the interval of "
      "that paired difference. DPO acc: held-out preference accuracy (implicit reward). Win rate: "
      "DPO model vs its starting (SFT) model, judged by the round's RM (ties half; wins / ties / "
      "losses in brackets, the interval from the per-prompt variance of that three-valued "
      "outcome; then, over the prompts where exactly one of the two responses verifies, how "
      "often the RM prefers that one: the judge's own accuracy on the only decisive outcomes a "
      "verifier can check; the stage's win_rate.jsonl has every judged pair). Win rate (sampled): "
      "the same judge over K sampled responses of each policy per prompt (temperature 1, top-p "
      "0.95; draw k of both policies from the same seed), ties half, the interval from the "
      "per-prompt mean outcome; the greedy responses differ on few prompts, the samples show "
      "the distributions DPO moved. An AVERAGE of reward "
      "models, SFT or DPO policies stands for its kind in its "
      "round. `p ± h`: h is the half-width of the 95% interval (for a proportion over the eval "
      "set 1.96 sqrt(p(1-p)/n)); differences smaller than that are noise.\n\n"
      "| round | RM acc | RM acc (own samples) | RM acc (common set) | RM gain (common set) | "
      "RS acceptance | RS best-of-K gain (verifier) | "
      "RS best-of-K gain (RM score) | RS RM pick / sample correct | SFT EM | DPO acc | DPO EM | "
      "DPO EM gain | DPO win rate vs SFT | DPO win rate vs SFT (sampled) | stages |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
  for (auto& [round, kinds] : rounds) {
    auto get = [&](StageKind k) { return kinds.count(k) ? kinds.at(k) : json::object(); };
    const json rm = get(REWARD_MODEL), rs = get(REJECTION_SAMPLING), sft = get(SFT), dpo = get(DPO);
    std::string st;
    for (auto& n : names[round]) st += (st.empty() ? "" : ", ") + n;
    md += fmt::format(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |\n",
        round ? std::to_string(round) : "-", with_interval(rm, "eval_accuracy", "eval_pairs"),
        with_interval(rm, "eval_accuracy_on_policy", "eval_pairs_on_policy"),
        with_interval(rm, "eval_accuracy_common", "eval_pairs_common"),
        paired_gain(rm, "common_fixed", "common_broken", "eval_pairs_common"),
        with_interval(rs, "acceptance", "prompts"), gain(rs), num(rs, "best_of_k_gain"),
        num(rs, "best_correct_rate"), num(rs, "sample_correct_rate"),
        with_interval(sft, "eval_exact_match", "eval_prompts"),
        with_interval(dpo, "eval_accuracy", "eval_pairs"),
        with_interval(dpo, "eval_exact_match", "eval_prompts"), paired_gain(dpo), win_rate(dpo),
        sampled_win_rate(dpo), st);
  }
  if (!averages.empty()) {
    md +=
        "\n### Model averages\n\n"
        "Each AVERAGE of post-training models evaluated like its inputs (RM: held-out pairwise "
        "accuracy; SFT and DPO: greedy exact match), beside each input's own figure: whether the "
        "average helped.\n\n"
        "| stage | round | of | metric | inputs | average |\n|---|---|---|---|---|---:|\n";
    for (int i : averages) {
      const Stage& s = stages[i];
      const bool rm = averaged_kind(lr, i) == REWARD_MODEL;
      const char* key = rm ? "eval_accuracy" : "eval_exact_match";
      const char* n_key = rm ? "eval_pairs" : "eval_prompts";
      std::string in;
      for (auto& n : s.average().stages())
        in += fmt::format("{}{} {}", in.empty() ? "" : ", ", n,
                          with_interval(final_of(n), key, n_key));
      md += fmt::format("| {} | {} | {} | {} | {} | {} |\n", s.name(),
                        s.round() ? std::to_string(s.round()) : "-",
                        StageKind_Name(averaged_kind(lr, i)), rm ? "RM acc" : "exact match", in,
                        with_interval(final_of(s.name()), key, n_key));
      if (averaged_kind(lr, i) == DPO) {  // and the win rate over the SFT model, DPO's aim
        std::string wi;
        for (auto& n : s.average().stages())
          wi += fmt::format("{}{} {}", wi.empty() ? "" : ", ", n, win_rate(final_of(n)));
        md += fmt::format("| {} | {} | DPO | win rate vs SFT | {} | {} |\n", s.name(),
                          s.round() ? std::to_string(s.round()) : "-", wi,
                          win_rate(final_of(s.name())));
      }
    }
  }
  return md;
}

}  // namespace llama3::recipes
