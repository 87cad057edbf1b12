#include "recipes/runner.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "recipes/evals.h"
#include "recipes/metrics_sink.h"
#include "recipes/post_stages.h"
#include "recipes/stage_comm.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/io/checkpoint.h"
#include "runtime/log/progress.h"
#include "text/data/build.h"
#include "text/train/trainer.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace llama3::recipes {

// ---------------------------------------------------------------- schedules

float token_lr(const Stage& s, int64_t tokens_after) {
  const double peak = s.optimizer().lr();
  const auto& l = s.lr();
  const bool anneal = s.kind() == ANNEAL;
  const double min_lr = anneal ? 0.0 : l.min_lr();
  const Decay decay = anneal ? LINEAR : l.decay();
  const int64_t warm = anneal ? 0 : l.warmup_tokens();
  const int64_t horizon = (!anneal && l.decay_tokens() > 0) ? l.decay_tokens() : s.total_tokens();
  const double t = double(tokens_after);
  if (warm > 0 && t < double(warm)) return float(peak * t / double(warm));
  if (decay == CONSTANT) return float(peak);
  const double span = std::max<double>(1.0, double(horizon - warm));
  const double x = std::clamp((t - double(warm)) / span, 0.0, 1.0);
  if (decay == LINEAR) return float(peak * (1.0 - x) + min_lr * x);  // exactly min_lr at x = 1
  return float(min_lr + 0.5 * (peak - min_lr) * (1.0 + std::cos(M_PI * x)));
}

BatchAt batch_at(const Stage& s, int64_t tokens) {
  const auto& b = s.batch();
  const int64_t dp = layout_of(s).dp();
  BatchAt r{b.batch_tokens(), b.seq_len(), 0};
  for (const auto& p : b.ramp()) {
    if (tokens < p.at_tokens()) break;
    r.batch_tokens = p.batch_tokens();
    if (p.seq_len() > 0) r.seq_len = p.seq_len();
  }
  r.micro_batch_tokens = b.micro_batch_tokens() > 0 ? b.micro_batch_tokens() : b.batch_tokens() / dp;
  return r;
}

// ---------------------------------------------------------------- helpers

namespace {

using clock_type = std::chrono::steady_clock;

// Eval batches hold 2048 tokens whatever the sequence length, so losses at different
// lengths average over the same amount of text.
int64_t eval_rows(int64_t seq) { return std::max<int64_t>(1, 2048 / seq); }

uint64_t seed_of(const Recipe& r, const Stage& s) { return s.seed() ? s.seed() : r.seed(); }

void write_json_atomic(const std::string& path, const json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    if (!f) fail("cannot write {}", tmp);
    f << j.dump(2) << '\n';
  }
  fs::rename(tmp, path);
}

// Drops metrics lines past `step` (written after the checkpoint a resumed stage restarts from).
void truncate_metrics(const std::string& stage_dir, int64_t step) {
  const std::string path = stage_dir + "/metrics.jsonl";
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    try {
      if (json::parse(line).value("step", int64_t(0)) <= step) kept += line + '\n';
    } catch (const json::exception&) {
      // a line cut by the kill: drop it
    }
  }
  in.close();
  std::ofstream(path, std::ios::trunc) << kept;
}

// The sources of a manifest with shard paths resolved relative to its directory.
struct DataSet {
  std::string dir;
  json manifest;
  std::vector<data::SourceSpec> sources, eval;
};

DataSet load_data(const std::string& dir) {
  DataSet d;
  d.dir = dir;
  const std::string mpath = dir + "/manifest.json";
  LLAMA3_CHECK(fs::exists(mpath), "data: {} does not exist", mpath);
  d.manifest = io::read_json(mpath);
  d.sources = data::read_manifest_sources(mpath);
  auto fix = [&](std::string& s) {
    if (fs::path(s).is_relative() && !fs::exists(s)) s = (fs::path(dir) / s).string();
  };
  for (auto& s : d.sources)
    for (auto& p : s.shards) fix(p);
  LLAMA3_CHECK(d.manifest.contains("eval"), "{}: no 'eval' shards (held-out data)", mpath);
  data::SourceSpec e{"eval", d.manifest["eval"]["shards"].get<std::vector<std::string>>(), 1.0};
  for (auto& p : e.shards) fix(p);
  d.eval = {e};
  return d;
}

std::string tokenizer_path(const DataSet& d) {
  std::string p = d.manifest.value("tokenizer", d.dir + "/tokenizer.model");
  if (!fs::exists(p)) p = d.dir + "/tokenizer.model";
  return p;
}

// A BatchSource whose sequence length, batch size and mix can change mid-stage, keeping
// the data position (the loader state does not depend on the row shape).
//
// Optionally a second lane: the first `task_per_step` of every `per_step` micro-batches come
// from their own loader drawing only the task sources (generated pass-key documents), the
// rest from the main mix. The trainer averages the micro-batches' mean losses, so the task
// micro-batches weigh task_per_step / per_step of every update whatever their token count:
// answer-only pass-key documents (a few answer tokens each) would otherwise be a fraction
// of a percent of the loss.
class RecipeSource : public text::BatchSource {
 public:
  RecipeSource(std::vector<data::SourceSpec> sources, uint64_t seed) : sources_(std::move(sources)), seed_(seed) {}

  // task_weights: empty or task_per_step 0: no task lane.
  void configure(int64_t seq, int64_t batch, const std::vector<double>& weights,
                 const std::vector<double>& task_weights = {}, int64_t task_per_step = 0, int64_t per_step = 1) {
    LLAMA3_CHECK(task_per_step < per_step || task_per_step == 0,
                 "{} pass-key micro-batches per step leave none of the step's {} for the mix", task_per_step,
                 per_step);
    if (seq != seq_ || batch != batch_) {
      main_.reshape(*this, seq, batch);
      if (task_.loader) task_.reshape(*this, seq, batch);
      seq_ = seq, batch_ = batch;
    }
    main_.set(*this, weights);
    if (task_per_step > 0) task_.set(*this, task_weights);
    if (task_per_step != task_per_step_ || per_step != per_step_) calls_ = 0;  // a new step pattern starts
    task_per_step_ = task_per_step, per_step_ = per_step;
  }
  data::Batch next() override {
    const bool task = task_per_step_ > 0 && calls_ % per_step_ < task_per_step_;
    ++calls_;
    return task ? task_.loader->next() : main_.loader->next();
  }
  json state() const override {
    json j = {{"seq_len", seq_}, {"batch", batch_}, {"weights", main_.weights}, {"loader", main_.loader->state()}};
    if (task_.loader) {
      j["task"] = {{"weights", task_.weights}, {"loader", task_.loader->state()}};
      j["calls"] = calls_;
      j["task_per_step"] = task_per_step_;
      j["per_step"] = per_step_;
    }
    return j;
  }
  void restore(const json& j) override {
    seq_ = j.at("seq_len").get<int64_t>(), batch_ = j.at("batch").get<int64_t>();
    main_.restore(*this, j.at("weights"), j.at("loader"), 0);
    task_ = Lane{1};
    task_per_step_ = 0, per_step_ = 1, calls_ = 0;
    if (j.contains("task")) {
      task_.restore(*this, j["task"].at("weights"), j["task"].at("loader"), 1);
      calls_ = j.at("calls").get<int64_t>();
      task_per_step_ = j.at("task_per_step").get<int64_t>();
      per_step_ = j.at("per_step").get<int64_t>();
    }
  }
  const std::vector<data::SourceSpec>& sources() const { return sources_; }

 private:
  struct Lane {
    explicit Lane(int which) : lane(which) {}
    int lane = 0;  // 0: main, 1: task (its own seed)
    std::unique_ptr<data::MixingLoader> loader;
    std::vector<double> weights;

    void build(const RecipeSource& r, int64_t seq, int64_t batch) {
      data::LoaderConfig c;
      c.sources = r.sources_;
      c.seq_len = seq;
      c.batch_size = batch;
      c.seed = r.seed_ + uint64_t(lane) * 0x9E3779B97F4A7C15ull;
      loader.reset();
      loader = std::make_unique<data::MixingLoader>(c);
    }
    void reshape(const RecipeSource& r, int64_t seq, int64_t batch) {
      if (!loader) return;
      json st = loader->state();
      st["seq_len"] = seq;
      build(r, seq, batch);
      loader->restore(st);
    }
    void set(const RecipeSource& r, const std::vector<double>& w) {
      if (!loader) {
        build(r, r.seq_, r.batch_);
        loader->set_weights(w);
        weights = w;
      } else if (w != weights) {
        loader->set_weights(w);
        weights = w;
      }
    }
    void restore(const RecipeSource& r, const json& w, const json& st, int which) {
      lane = which;
      build(r, r.seq_, r.batch_);
      weights = w.get<std::vector<double>>();
      loader->restore(st);
    }
  };

  std::vector<data::SourceSpec> sources_;
  uint64_t seed_;
  Lane main_{0}, task_{1};
  int64_t seq_ = 0, batch_ = 0;
  int64_t task_per_step_ = 0, per_step_ = 1, calls_ = 0;
};

class StageRunner {
 public:
  StageRunner(const LoadedRecipe& lr, int index, const RunOptions& o)
      : lr_(lr), r_(lr.recipe()), s_(r_.stage(index)), index_(index), opts_(o),
        comm_(o.world, is_training(s_.kind()) && layout_of(s_).world() > 1) {
    dir_ = (fs::path(o.run_dir) / s_.name()).string();
  }

  json run() {
    fs::create_directories(dir_);
    switch (s_.kind()) {
      case DATA: return run_data();
      case PRETRAIN:
      case LONG_CONTEXT:
      case ANNEAL: return run_train();
      case AVERAGE: return run_average();
      case EVAL: return run_eval();
      case POST_DATA:
      case SFT:
      case REWARD_MODEL:
      case REJECTION_SAMPLING:
      case DPO: return run_post_stage(lr_, index_, opts_.run_dir, opts_.quiet);
      default: fail("stage '{}': kind {} is not implemented in this build", s_.name(), StageKind_Name(s_.kind()));
    }
  }

 private:
  // Shadows recipes::write_metrics inside the stage: rank 0 alone writes (recipes/stage_comm.h).
  void write_metrics(const std::string& dir, const std::string& stage, int64_t step, const json& f) const {
    if (comm_.lead()) recipes::write_metrics(dir, stage, step, f);
  }
  std::string stage_dir(const std::string& name) const { return (fs::path(opts_.run_dir) / name).string(); }
  std::string model_dir(const std::string& name) const { return stage_dir(name) + "/model"; }

  DataSet data() const {
    const std::string dir = s_.data_from().empty() ? s_.data_dir() : stage_dir(s_.data_from());
    return load_data(dir);
  }

  // ---- DATA
  json run_data() {
    data::DemoOptions o;
    o.out_dir = dir_;
    const auto& d = s_.data();
    if (d.vocab_size()) o.vocab_size = d.vocab_size();
    if (d.general_bytes()) o.general_bytes = d.general_bytes();
    if (d.code_bytes()) o.code_bytes = d.code_bytes();
    if (d.math_problems()) o.math_problems = d.math_problems();
    if (d.multilingual_bytes()) o.multilingual_bytes = d.multilingual_bytes();
    if (d.eval_every()) o.eval_every = d.eval_every();
    o.seed = seed_of(r_, s_) ? seed_of(r_, s_) : 1;
    data::build_demo(o);
    DataSet ds = load_data(dir_);
    json f = {{"vocab_size", ds.manifest["vocab_size"]}, {"eval_tokens", ds.manifest["eval"]["tokens"]}};
    int64_t total = 0;
    for (auto& s : ds.manifest["sources"]) {
      f["tokens_" + s["name"].get<std::string>()] = s["tokens"];
      total += s["tokens"].get<int64_t>();
    }
    f["tokens"] = total;
    return f;
  }

  // ---- AVERAGE
  json run_average() {
    const auto& a = s_.average();
    std::vector<std::string> in;
    for (auto& st : a.stages()) in.push_back(model_dir(st));
    for (auto& c : a.checkpoints()) in.push_back(c);
    average_checkpoints(in, {a.weights().begin(), a.weights().end()}, dir_ + "/model");
    json f =
        evaluate_post_average(lr_, index_, opts_.run_dir);  // empty unless post-training models
    f["inputs"] = int64_t(in.size());
    return f;
  }

  // ---- EVAL
  json run_eval() {
    DataSet ds = data();
    auto model = text::load_model(model_dir(s_.init_from()));
    const auto& e = s_.eval();
    const int64_t seq = e.seq_len() > 0 ? e.seq_len() : 256;
    json f;
    f["eval_loss"] = eval_loss(*model, ds.eval, seq, eval_rows(seq), e.batches() > 0 ? e.batches() : 8);
    f["eval_ppl"] = std::exp(f["eval_loss"].get<double>());
    std::vector<std::string> shards;
    for (auto& sp : ds.eval) shards.insert(shards.end(), sp.shards.begin(), sp.shards.end());
    f["unigram_entropy"] = unigram_entropy(shards);
    f["params"] = model->config().num_params();
    if (e.niah().samples() > 0) {
      auto tok = text::Tokenizer::load(tokenizer_path(ds));
      Needles needles(tok, shards, key_digits());
      for (int64_t L : niah_lengths(seq)) {
        auto res = niah_eval(*model, needles, L, e.niah().samples(), candidates(), niah_seed());
        f[fmt::format("niah_{}_acc", L)] = res.accuracy();
      }
    }
    f["chance_niah"] = 1.0 / candidates();
    write_metrics(dir_, s_.name(), 0, f);
    return f;
  }

  int key_digits() const { return std::max<int>(1, int(s_.eval().niah().key_digits())); }
  int candidates() const { return s_.eval().niah().candidates() > 0 ? int(s_.eval().niah().candidates()) : 4; }
  uint64_t niah_seed() const { return s_.eval().niah().seed() ? s_.eval().niah().seed() : 777; }
  std::vector<int64_t> niah_lengths(int64_t seq) const {
    std::vector<int64_t> v(s_.eval().niah().lengths().begin(), s_.eval().niah().lengths().end());
    if (v.empty()) v.push_back(seq);
    return v;
  }

  // ---- PRETRAIN / LONG_CONTEXT / ANNEAL
  json run_train();

  // A progress line from `step0` (steps done) to the stage's last step (`tokens`: stage tokens
  // done), or for long-context increment `inc` to its max_tokens_per_increment cap (`tokens`:
  // the increment's tokens done).
  std::unique_ptr<log::ProgressLine> progress_line(int inc, int64_t step0, int64_t tokens, int64_t batch,
                                                   double peak) const {
    log::ProgressOptions po;
    po.stage = s_.name();
    po.peak_flops = peak;
    if (!opts_.device.is_cpu()) po.peak_name = "MFU";
    int64_t steps = step0;
    if (inc >= 0) {
      const auto& lcs = s_.long_context();
      po.stage += fmt::format(" seq {}", lcs.seq_lens(inc));
      const int64_t left = std::max<int64_t>(0, lcs.max_tokens_per_increment() - tokens);
      steps += (left + batch - 1) / batch;  // at most; fewer once adapted
    } else {
      for (int64_t t = tokens; t < s_.total_tokens(); ++steps) t += batch_at(s_, t).batch_tokens;
    }
    po.total_steps = steps;
    return std::make_unique<log::ProgressLine>(po);
  }

  const LoadedRecipe& lr_;
  const Recipe& r_;
  const Stage& s_;
  int index_;
  const RunOptions& opts_;
  StageComm comm_;
  std::string dir_;
};

json StageRunner::run_train() {
  DataSet ds = data();
  const uint64_t seed = seed_of(r_, s_);
  const bool lc = s_.kind() == LONG_CONTEXT, anneal = s_.kind() == ANNEAL;

  // Model: an earlier stage's, or a fresh flavour sized to the tokenizer.
  std::unique_ptr<text::LlamaModel> model;
  int64_t short_seq = s_.batch().seq_len();
  if (!s_.init_from().empty()) {
    model = text::load_model(model_dir(s_.init_from()));
    const int ii = lr_.stage_index(s_.init_from());
    if (ii >= 0 && is_training(r_.stage(ii).kind()) && r_.stage(ii).kind() != LONG_CONTEXT)
      short_seq = batch_at(r_.stage(ii), 0).seq_len;
  } else {
    text::LlamaConfig c = text::llama3_flavour(s_.model().flavour());
    const auto& m = s_.model();
    if (m.dim()) c.dim = m.dim();
    if (m.n_layers()) c.n_layers = m.n_layers();
    if (m.n_heads()) c.n_heads = m.n_heads();
    if (m.n_kv_heads()) c.n_kv_heads = m.n_kv_heads();
    if (m.rope_theta()) c.rope_theta = m.rope_theta();
    c.vocab_size = m.vocab_size() ? m.vocab_size() : ds.manifest.at("vocab_size").get<int64_t>();
    model = std::make_unique<text::LlamaModel>(c, seed);
  }
  if (lc && s_.long_context().short_seq_len() > 0) short_seq = s_.long_context().short_seq_len();
  int64_t max_seq = s_.batch().seq_len();
  for (auto& p : s_.batch().ramp()) max_seq = std::max(max_seq, p.seq_len());
  for (auto L : s_.long_context().seq_lens()) max_seq = std::max(max_seq, L);
  for (auto L : s_.eval().niah().lengths()) max_seq = std::max(max_seq, L);
  if (model->config().max_seq_len < max_seq) {
    // max_seq_len only bounds the RoPE tables; rebuild with the same weights.
    text::LlamaConfig c = model->config();
    c.max_seq_len = max_seq;
    std::unique_ptr<text::LlamaModel> bigger;
    {
      nn::SkipInitGuard overwritten;  // every parameter is copied below
      bigger = std::make_unique<text::LlamaModel>(c, seed);
    }
    auto src = model->named_parameters();
    auto dst = bigger->named_parameters();
    for (size_t i = 0; i < src.size(); ++i) dst[i].tensor->detach().copy_(*src[i].tensor);
    model = std::move(bigger);
  }
  const std::string prec = s_.model().precision();
  model->options().precision = prec == "bf16" ? ops::Precision::bf16 : ops::Precision::f32;
  model->options().activation_checkpointing = s_.model().activation_checkpointing();
  const Device device = opts_.device;
  if (!device.is_cpu()) {
    LLAMA3_CHECK(!comm_.group(),
                 "stage '{}': a layout of {} ranks with --device {}: the runner trains on a "
                 "GPU in one process (multi-GPU layouts: llama3 train --device cuda --parallel)",
                 s_.name(), layout_of(s_).world(), device.str());
    model->to(device);
  }

  // Sources: the manifest's, plus one synthetic pass-key source per long-context length.
  std::vector<data::SourceSpec> sources = ds.sources;
  std::vector<double> base(sources.size());
  for (size_t i = 0; i < sources.size(); ++i) base[i] = sources[i].weight;
  std::unique_ptr<text::Tokenizer> tok;
  std::unique_ptr<Needles> train_needles, eval_needles;
  std::vector<std::string> eval_shards;
  for (auto& sp : ds.eval) eval_shards.insert(eval_shards.end(), sp.shards.begin(), sp.shards.end());
  const double syn_w = lc ? s_.long_context().synthetic_niah_weight() : 0.0;
  const double pre_w = s_.kind() == PRETRAIN ? s_.synthetic_niah().weight() : 0.0;
  // Whole micro-batches of pass-key documents per step (RecipeSource's task lane).
  const int64_t pre_k = s_.kind() == PRETRAIN ? s_.synthetic_niah().micro_batches() : 0;
  const int64_t syn_k = lc ? s_.long_context().synthetic_niah_micro_batches() : 0;
  const bool pre_on = pre_w > 0 || pre_k > 0, syn_on = syn_w > 0 || syn_k > 0;
  if (s_.eval().niah().samples() > 0 || syn_on || pre_on) {
    tok = std::make_unique<text::Tokenizer>(text::Tokenizer::load(tokenizer_path(ds)));
    eval_needles = std::make_unique<Needles>(*tok, eval_shards, key_digits());
  }
  if (syn_on || pre_on) {
    std::vector<std::string> filler;
    for (auto& sp : ds.sources)
      if (sp.name == "general") filler = sp.shards;
    if (filler.empty()) filler = ds.sources[0].shards;
    train_needles = std::make_unique<Needles>(*tok, filler, key_digits());
  }
  if (pre_on) {
    const int64_t seq = s_.batch().seq_len();
    const int64_t lo = s_.synthetic_niah().min_len() > 0 ? s_.synthetic_niah().min_len() : std::max<int64_t>(64, seq / 4);
    const int64_t hi = s_.synthetic_niah().max_len() > 0 ? s_.synthetic_niah().max_len() : std::max(lo, seq);
    const std::string path = fmt::format("{}/niah_train.shard", dir_);
    if (comm_.lead() && !fs::exists(path)) train_needles->write_training_shard(path, 4000, lo, hi, seed * 31);
    comm_.sync();
    sources.push_back({"niah", {path}, 0.0, /*no_straddle=*/true,
                       s_.synthetic_niah().answer_only() ? train_needles->answer_tokens() + 1 : 0});
    base.push_back(0.0);
  }
  if (syn_on) {
    for (int64_t L : s_.long_context().seq_lens()) {
      const std::string path = fmt::format("{}/niah_train_{}.shard", dir_, L);
      if (comm_.lead() && !fs::exists(path))
        train_needles->write_training_shard(path, 2000, L / 4, L, seed * 31 + uint64_t(L));
      comm_.sync();
      sources.push_back({fmt::format("niah_{}", L), {path}, 0.0, /*no_straddle=*/true,
                         s_.long_context().synthetic_niah_answer_only() ? train_needles->answer_tokens() + 1 : 0});
      base.push_back(0.0);
    }
  }
  auto index_of = [&](const std::string& name) -> int {
    for (size_t i = 0; i < sources.size(); ++i)
      if (sources[i].name == name) return int(i);
    return -1;
  };
  // Mix schedule: weights in force at `tokens` (unlisted sources: 0).
  std::vector<std::vector<double>> mix_w;
  for (int j = 0; j < s_.mix_size(); ++j) {
    std::vector<double> w(sources.size(), 0.0);
    for (auto& [name, v] : s_.mix(j).weights()) {
      const int k = index_of(name);
      if (k < 0) {
        std::string names;
        for (auto& sp : ds.sources) names += (names.empty() ? "" : ", ") + sp.name;
        fail("{}: stage '{}' field mix[{}].weights: no source '{}' in the data (sources: {})",
             lr_.where(index_, fmt::format("mix[{}].weights", j)), s_.name(), j, name, names);
      }
      w[size_t(k)] = v;
    }
    mix_w.push_back(w);
  }
  auto weights_at = [&](int64_t tokens, int increment) {
    std::vector<double> w = base;
    for (int j = 0; j < s_.mix_size(); ++j)
      if (tokens >= s_.mix(j).at_tokens()) w = mix_w[size_t(j)];
    if (pre_on && tokens < s_.synthetic_niah().only_tokens()) {
      std::fill(w.begin(), w.end(), 0.0);  // the retrieval warm-up: pass-key documents alone
      w[size_t(index_of("niah"))] = 1.0;
    } else if (pre_w > 0) {
      double sum = 0;
      for (double x : w) sum += x;
      for (double& x : w) x *= (1.0 - pre_w) / sum;
      w[size_t(index_of("niah"))] = pre_w;
    }
    if (syn_w > 0 && increment >= 0) {
      double sum = 0;
      for (double x : w) sum += x;
      for (double& x : w) x *= (1.0 - syn_w) / sum;
      w[size_t(index_of(fmt::format("niah_{}", s_.long_context().seq_lens(increment))))] = syn_w;
    }
    return w;
  };

  RecipeSource source(sources, seed + 1);
  text::TrainerConfig tc;
  tc.steps = int64_t(1) << 60;
  tc.cuda_graph = opts_.cuda_graph;
  const auto& o = s_.optimizer();
  tc.adamw.lr = float(o.lr());
  if (o.beta1()) tc.adamw.beta1 = float(o.beta1());
  if (o.beta2()) tc.adamw.beta2 = float(o.beta2());
  if (o.eps()) tc.adamw.eps = float(o.eps());
  if (o.weight_decay()) tc.adamw.weight_decay = float(o.weight_decay());
  if (o.max_grad_norm()) tc.adamw.max_grad_norm = float(o.max_grad_norm());
  int64_t cur_batch = 0;
  // LC stages have no stage-wide token horizon; they train at a constant LR after warm-up.
  tc.lr_fn = [&](int64_t, int64_t tokens) {
    if (lc) {
      const double w = double(s_.lr().warmup_tokens()), t = double(tokens + cur_batch);
      return float(s_.optimizer().lr() * (w > 0 && t < w ? t / w : 1.0));
    }
    return token_lr(s_, tokens + cur_batch);
  };
  // Under a layout each trainer micro-batch is the global one (dp x the per-rank micro-batch).
  const int64_t dpn = comm_.group() ? layout_of(s_).dp() : 1;
  tc.parallel = trainer_parallel(s_, model->config(), batch_at(s_, 0).seq_len, batch_at(s_, 0).micro_batch_size() * dpn,
                                 comm_.group());
  if (lc)  // every increment's length must suit the layout too (cp splits it in 2 cp chunks)
    for (int64_t L : s_.long_context().seq_lens()) {
      BatchAt b = batch_at(s_, 0);
      b.seq_len = L;
      trainer_parallel(s_, model->config(), L, b.micro_batch_size() * dpn, comm_.group());
    }
  text::Trainer trainer(*model, tc, source);
  // The whole model for evals and outputs: gathered from the ranks under a layout
  // (collective), until annealing replaces it with the average.
  bool averaged = false;
  auto whole = [&]() -> text::LlamaModel& { return averaged ? *model : trainer.full_model(); };
  const std::string ckpt = dir_ + "/checkpoint";
  json& x = trainer.extra_state;
  const int64_t eval_batches = s_.eval().batches() > 0 ? s_.eval().batches() : 4;
  const int niah_c = candidates();
  const int64_t niah_n = s_.eval().niah().samples();

  auto short_loss = [&](int64_t seq) {
    auto& m = whole();
    return comm_.shared([&] { return eval_loss(m, ds.eval, seq, eval_rows(seq), eval_batches); });
  };
  auto niah = [&](int64_t L) {
    auto& m = whole();
    return comm_.shared([&] { return niah_eval(m, *eval_needles, L, niah_n, niah_c, niah_seed()).accuracy(); });
  };

  if (fs::exists(ckpt)) {
    trainer.load(ckpt);
    if (comm_.lead()) truncate_metrics(dir_, trainer.steps_done());
    spdlog::info("stage {}: resumed from {} at step {} ({} tokens)", s_.name(), ckpt, trainer.steps_done(),
                 trainer.tokens_seen());
  } else {
    if (comm_.lead()) fs::remove(dir_ + "/metrics.jsonl");
    x = json::object();
    x["increment"] = 0;
    x["increment_start"] = 0;
    x["snapshots"] = json::array();
    x["results"] = json::object();
    if (lc) {
      // Pre-extension reference values, measured once with the input model.
      json& res = x["results"];
      res["short_loss_before"] = short_loss(short_seq);
      res["short_seq_len"] = short_seq;
      if (niah_n > 0)
        for (int64_t L : s_.long_context().seq_lens()) res[fmt::format("niah_{}_before", L)] = niah(L);
      json line = res;
      write_metrics(dir_, s_.name(), 0, line);
      spdlog::info("stage {}: before extension: {}", s_.name(), res.dump());
    } else if (niah_n > 0) {
      for (int64_t L : niah_lengths(s_.batch().seq_len())) x["results"][fmt::format("niah_{}_before", L)] = niah(L);
    }
  }

  // The progress line's percentage: of the CPU's measured GEMM peak, or on a GPU MFU against
  // the card's datasheet peak (0 for a card not in the table: none shown).
  const double peak = device.is_cpu() ? cpu_gemm_peak_flops(prec == "bf16", 1024)
                                      : cuda_peak_flops(device.index, prec == "bf16");
  const int64_t every = s_.eval().every_tokens();
  const int64_t ckpt_every = s_.checkpoint_every_steps();
  const auto& lcs = s_.long_context();
  int64_t last_eval_step = -1;
  // The live progress line (plain log lines when stdout is not a terminal): one per stage,
  // or per long-context increment with its token cap as the total.
  std::unique_ptr<log::ProgressLine> progress;
  int progress_inc = -2;
  auto say = [&](const std::string& text) {
    if (progress) progress->message(text);
    else spdlog::info("{}", text);
  };
  for (;;) {
    const int64_t t = trainer.tokens_seen();
    const int inc = lc ? x["increment"].get<int>() : -1;
    if (lc ? inc >= lcs.seq_lens_size() : t >= s_.total_tokens()) break;
    BatchAt b = batch_at(s_, t);
    if (lc) b.seq_len = lcs.seq_lens(inc);
    cur_batch = b.batch_tokens;
    LLAMA3_CHECK(b.grad_accum() % dpn == 0, "stage '{}': {} micro-batches per step are not divisible by dp {}",
                 s_.name(), b.grad_accum(), dpn);
    {
      // The task lane: whole micro-batches of the current pass-key source (none in a warm-up,
      // where every row is one already).
      const int64_t k = lc ? syn_k : (t < s_.synthetic_niah().only_tokens() ? 0 : pre_k);
      std::vector<double> task_w;
      if (k > 0) {
        task_w.assign(sources.size(), 0.0);
        task_w[size_t(index_of(lc ? fmt::format("niah_{}", lcs.seq_lens(inc)) : std::string("niah")))] = 1.0;
      }
      source.configure(b.seq_len, b.micro_batch_size() * dpn, weights_at(t, inc), task_w, k, b.grad_accum() / dpn);
    }
    trainer.set_grad_accum(b.grad_accum() / dpn);
    text::StepStats st = trainer.step();
    const int64_t t1 = trainer.tokens_seen();
    json m = {{"tokens", t1},
              {"loss", st.loss},
              {"lr", st.lr},
              {"grad_norm", st.grad_norm},
              {"tokens_per_s", st.tokens_per_s},
              {"seq_len", b.seq_len},
              {"batch_tokens", b.batch_tokens}};
    if (peak > 0) m[device.is_cpu() ? "pct_gemm_peak" : "mfu"] = 100.0 * st.flops_per_s / peak;
    if (opts_.cuda_graph) m["graph"] = st.graph;  // whether the step was a replay
    write_metrics(dir_, s_.name(), st.step, m);
    if (!opts_.quiet) {
      if (!progress || inc != progress_inc)
        progress = progress_line(inc, st.step - 1, lc ? t - x["increment_start"].get<int64_t>() : t, b.batch_tokens,
                                 peak);
      progress_inc = inc;
      progress->update({.step = st.step, .loss = st.loss, .lr = st.lr, .tokens_per_s = st.tokens_per_s,
                        .flops_per_s = st.flops_per_s, .step_seconds = st.seconds});
    }
    if (every > 0 && t / every != t1 / every) {
      const double el = short_loss(b.seq_len);
      write_metrics(dir_, s_.name(), st.step, {{"tokens", t1}, {"eval_loss", el}});
      last_eval_step = st.step;
      if (!opts_.quiet) say(fmt::format("{} eval at {} tokens: loss {:.4f}", s_.name(), t1, el));
    }
    if (anneal && s_.anneal().average_every_tokens() > 0) {
      const int64_t ae = s_.anneal().average_every_tokens();
      if (t / ae != t1 / ae || t1 >= s_.total_tokens()) {
        const std::string snap = fmt::format("{}/snapshots/tokens_{:012}", dir_, t1);
        fs::create_directories(dir_ + "/snapshots");
        auto& m = whole();
        if (comm_.lead()) text::save_model(m, snap);
        bool known = false;
        for (auto& e : x["snapshots"]) known = known || e == snap;
        if (!known) x["snapshots"].push_back(snap);
      }
    }
    if (lc) {
      const int64_t start = x["increment_start"].get<int64_t>();
      const int64_t done = t1 - start, ce = lcs.check_every_tokens();
      const bool check = (done / ce != (t - start) / ce) || done >= lcs.max_tokens_per_increment();
      if (check && done >= lcs.min_tokens_per_increment()) {
        const int64_t L = lcs.seq_lens(inc);
        json& res = x["results"];
        const double sl = short_loss(short_seq);
        const double nacc = niah_n > 0 ? niah(L) : 1.0;
        const bool recovered = sl <= res["short_loss_before"].get<double>() + lcs.short_loss_tolerance();
        const bool solved = nacc >= lcs.niah_threshold();
        write_metrics(dir_, s_.name(), st.step,
                      {{"tokens", t1}, {"eval_short_loss", sl}, {fmt::format("niah_{}_acc", L), nacc}});
        say(fmt::format("{} increment {} (seq {}): {} tokens, short-context loss {:.4f} (before {:.4f}, tol {}), "
                        "NIAH {:.2f} (threshold {}){}",
                        s_.name(), inc, L, done, sl, res["short_loss_before"].get<double>(),
                        lcs.short_loss_tolerance(), nacc, lcs.niah_threshold(), recovered && solved ? ": adapted" : ""));
        if ((recovered && solved) || done >= lcs.max_tokens_per_increment()) {
          if (!(recovered && solved) && lcs.require_adapted())
            fail("stage '{}': increment to seq_len {} not adapted after {} tokens (short loss {:.4f} vs {:.4f}+{}, "
                 "NIAH {:.2f} vs {})",
                 s_.name(), L, done, sl, res["short_loss_before"].get<double>(), lcs.short_loss_tolerance(), nacc,
                 lcs.niah_threshold());
          res[fmt::format("lc_{}_tokens", L)] = done;
          res[fmt::format("lc_{}_short_loss", L)] = sl;
          res[fmt::format("niah_{}_after", L)] = nacc;
          res[fmt::format("lc_{}_adapted", L)] = (recovered && solved) ? 1 : 0;
          x["increment"] = inc + 1;
          x["increment_start"] = t1;
        }
      }
    }
    if (ckpt_every > 0 && st.step % ckpt_every == 0) trainer.save(ckpt);
  }
  progress.reset();  // ends the in-place line before the stage's closing log lines
  trainer.save(ckpt);

  // Output model: the trained weights, or for annealing the Polyak average of its snapshots.
  json f = x["results"];
  if (anneal && !x["snapshots"].empty()) {
    std::vector<std::string> snaps = x["snapshots"].get<std::vector<std::string>>();
    const int64_t last = s_.anneal().average_last();
    if (last > 0 && int64_t(snaps.size()) > last) snaps.erase(snaps.begin(), snaps.end() - last);
    f["eval_loss_last"] = short_loss(batch_at(s_, 0).seq_len);
    if (comm_.lead()) average_checkpoints(snaps, {}, dir_ + "/model");
    comm_.sync();
    model = text::load_model(dir_ + "/model");
    if (!device.is_cpu()) model->to(device);  // the evaluations below
    averaged = true;
    f["averaged_checkpoints"] = int64_t(snaps.size());
  } else {
    auto& m = whole();
    if (comm_.lead()) text::save_model(m, dir_ + "/model");
  }
  const int64_t final_seq = lc ? lcs.seq_lens(lcs.seq_lens_size() - 1) : batch_at(s_, s_.total_tokens()).seq_len;
  f["eval_loss"] = short_loss(final_seq);
  if (niah_n > 0 && !lc)
    for (int64_t L : niah_lengths(s_.batch().seq_len())) f[fmt::format("niah_{}_after", L)] = niah(L);
  f["tokens"] = trainer.tokens_seen();
  f["steps"] = trainer.steps_done();
  f["params"] = model->config().num_params();
  if (!lc) f["lr_last"] = token_lr(s_, trainer.tokens_seen());
  // The final eval line, unless the last step already logged the same eval.
  if (last_eval_step != trainer.steps_done() || f.contains("averaged_checkpoints") || lc)
    write_metrics(dir_, s_.name(), trainer.steps_done(),
                  json{{"tokens", trainer.tokens_seen()}, {"eval_loss", f["eval_loss"]}});
  return f;
}

}  // namespace

// ---------------------------------------------------------------- plan

void print_plan(const LoadedRecipe& lr, std::ostream& out) {
  const Recipe& r = lr.recipe();
  const double peak = cpu_gemm_peak_flops(false, 1024);
  out << fmt::format("recipe '{}' from {}: {} stages; this machine's f32 GEMM peak {:.1f} GFLOP/s, estimates assume "
                     "{:.0f}% of it\n",
                     r.name(), lr.file(), r.stage_size(), peak / 1e9, kEfficiency * 100);
  out << fmt::format("{:<14} {:<13} {:>10} {:>12} {:>11} {:>10} {:>14}  {}\n", "stage", "kind", "params", "tokens",
                     "FLOPs", "ranks", "est. time", "notes");
  std::map<std::string, text::LlamaConfig> cfgs;
  double total_s = 0;
  for (const Stage& s : r.stage()) {
    std::string params = "-", tokens = "-", flops_s = "-", time_s = "-", notes;
    const Layout L = layout_of(s);
    if (is_training(s.kind())) {
      text::LlamaConfig c;
      if (!s.init_from().empty() && cfgs.count(s.init_from())) {
        c = cfgs[s.init_from()];
      } else {
        c = text::llama3_flavour(s.model().flavour().empty() ? "tiny" : s.model().flavour());
        if (s.model().dim()) c.dim = s.model().dim();
        if (s.model().n_layers()) c.n_layers = s.model().n_layers();
        if (s.model().n_heads()) c.n_heads = s.model().n_heads();
        if (s.model().n_kv_heads()) c.n_kv_heads = s.model().n_kv_heads();
        if (s.model().vocab_size()) c.vocab_size = s.model().vocab_size();
        if (!s.data_from().empty()) notes += "vocab from data; ";
      }
      cfgs[s.name()] = c;
      double flops = 0;
      int64_t toks = 0;
      if (s.kind() == LONG_CONTEXT) {
        for (int64_t len : s.long_context().seq_lens()) {
          flops += c.flops_per_token(len) * double(s.long_context().max_tokens_per_increment());
          toks += s.long_context().max_tokens_per_increment();
        }
        notes += fmt::format("{} increments to {} (at most)", s.long_context().seq_lens_size(),
                             s.long_context().seq_lens(s.long_context().seq_lens_size() - 1));
      } else {
        // Integrate the ramp: each segment at its sequence length.
        std::vector<std::pair<int64_t, int64_t>> seg{{0, s.batch().seq_len()}};
        for (auto& p : s.batch().ramp()) seg.push_back({p.at_tokens(), p.seq_len() ? p.seq_len() : seg.back().second});
        for (size_t i = 0; i < seg.size(); ++i) {
          const int64_t end = i + 1 < seg.size() ? seg[i + 1].first : s.total_tokens();
          flops += c.flops_per_token(seg[i].second) * double(end - seg[i].first);
        }
        toks = s.total_tokens();
        const BatchAt b0 = batch_at(s, 0);
        notes += fmt::format("batch {}x{} ({} micro-batches of {} tokens per rank)", b0.batch_tokens / b0.seq_len,
                             b0.seq_len, b0.grad_accum() / L.dp(), b0.micro_batch_tokens);
        if (s.batch().ramp_size()) {
          const BatchAt bl = batch_at(s, s.total_tokens());
          notes += fmt::format(" -> {}x{} via {} ramp points", bl.batch_tokens / bl.seq_len, bl.seq_len,
                               s.batch().ramp_size());
        }
      }
      params = fmt::format("{:.3g}", double(c.num_params()));
      tokens = fmt::format("{:.3g}", double(toks));
      flops_s = fmt::format("{:.3g}", flops);
      const double secs = flops / (peak * kEfficiency);
      total_s += secs;
      time_s = secs < 3600 ? fmt::format("{:.1f} s", secs)
                           : secs < 86400 * 365 ? fmt::format("{:.1f} h", secs / 3600)
                                                : fmt::format("{:.3g} years", secs / (86400 * 365.0));
    } else if (s.kind() == AVERAGE) {
      notes = fmt::format("mean of {} checkpoints", s.average().stages_size() + s.average().checkpoints_size());
      if (!s.average().stages().empty() && cfgs.count(s.average().stages(0))) cfgs[s.name()] = cfgs[s.average().stages(0)];
    } else if (s.kind() == DATA) {
      notes = "builds the demo corpus + tokenizer";
    } else if (s.kind() == EVAL) {
      notes = "held-out loss, unigram entropy, NIAH";
    } else if (is_post_kind(s.kind())) {
      const PostPlan p = plan_post_stage(lr, lr.stage_index(s.name()), cfgs.count(s.init_from()) ? &cfgs[s.init_from()] : nullptr);
      notes = p.notes;
      if (p.config && post_produces_model(s.kind())) cfgs[s.name()] = *p.config;
      if (p.config) params = fmt::format("{:.3g}", double(p.config->num_params()));
      if (p.flops > 0) {
        const double secs = p.flops / (peak * kEfficiency);
        total_s += secs;
        tokens = fmt::format("{:.3g}", p.tokens);
        flops_s = fmt::format("{:.3g}", p.flops);
        time_s = fmt::format("{:.1f} s", secs);
      }
    }
    out << fmt::format("{:<14} {:<13} {:>10} {:>12} {:>11} {:>10} {:>14}  {}\n", s.name(), StageKind_Name(s.kind()),
                       params, tokens, flops_s, L.world() > 1 ? fmt::format("{}", L.world()) : "1", time_s, notes);
    if (L.world() > 1)
      out << fmt::format("{:<14} layout: dp_shard {} x tp {} x pp {} x cp {} x dp_replicate {} = {} ranks\n", "",
                         L.dp_shard, L.tp, L.pp, L.cp, L.dp_replicate, L.world());
  }
  out << fmt::format("total estimated training time on this machine: {:.3g} s ({:.3g} h)\n", total_s, total_s / 3600);
}

// ---------------------------------------------------------------- run

std::string final_table(const LoadedRecipe& lr, const std::string& run_dir) {
  std::ostringstream out;
  out << fmt::format("{:<14} {:<13} {}\n", "stage", "kind", "final metrics");
  for (const Stage& s : lr.recipe().stage()) {
    const std::string p = run_dir + "/" + s.name() + "/final.json";
    if (!fs::exists(p)) {
      out << fmt::format("{:<14} {:<13} (not run)\n", s.name(), StageKind_Name(s.kind()));
      continue;
    }
    json f = io::read_json(p);
    std::string line;
    int n = 0;
    for (auto& [k, v] : f.items()) {
      std::string val = v.is_number_float() ? fmt::format("{:.4g}", v.get<double>()) : v.dump();
      if (n && n % 4 == 0) line += fmt::format("\n{:<28}", "");
      line += fmt::format("{:<30}", k + "=" + val);
      ++n;
    }
    out << fmt::format("{:<14} {:<13} {}\n", s.name(), StageKind_Name(s.kind()), line);
  }
  return out.str();
}

void run_recipe(const LoadedRecipe& lr, const RunOptions& opts) {
  const Recipe& r = lr.recipe();
  const std::string run = opts.run_dir;
  // Under mpirun every rank runs this loop; rank 0 alone writes the run's records.
  const StageComm all(opts.world, true);
  const bool lead = all.lead();
  if (!opts.device.is_cpu() && lead)
    spdlog::info(
        "the text training stages (pretrain, long context, annealing) run on {}; the other stages "
        "on "
        "the CPU",
        backend_for(opts.device).name());
  fs::create_directories(run);
  const std::string text = to_text(r);
  const std::string rpath = run + "/recipe.textproto";
  if (lead && fs::exists(rpath)) {
    std::ifstream in(rpath);
    std::stringstream ss;
    ss << in.rdbuf();
    if (ss.str() != text)
      spdlog::warn("{} differs from the recipe being run (changed file or --set); finished stages are kept", rpath);
  }
  if (lead) std::ofstream(rpath, std::ios::trunc) << text;

  const std::string spath = run + "/state.json";
  json state = fs::exists(spath) ? io::read_json(spath) : json{{"finished", json::array()}};
  if (!state.contains("seconds")) state["seconds"] = json::object();
  auto finished = [&](const std::string& n) {
    for (auto& e : state["finished"])
      if (e == n) return true;
    return false;
  };
  int first = 0, last = r.stage_size() - 1;
  if (!opts.only.empty() || !opts.from.empty()) {
    const std::string& name = opts.only.empty() ? opts.from : opts.only;
    const int i = lr.stage_index(name);
    if (i < 0) {
      std::string names;
      for (auto& s : r.stage()) names += (names.empty() ? "" : ", ") + s.name();
      fail("{} {}: no such stage (stages: {})", opts.only.empty() ? "--from" : "--only", name, names);
    }
    first = i;
    if (!opts.only.empty()) last = i;
    // The chosen stages run again from scratch.
    json keep = json::array();
    for (auto& e : state["finished"]) {
      const int k = lr.stage_index(e.get<std::string>());
      if (k < first || k > last) keep.push_back(e);
    }
    state["finished"] = keep;
    // Their time starts again too (a resumed stage adds to its time; one run from scratch
    // does not add to the discarded run's).
    for (int k = first; k <= last; ++k) state["seconds"].erase(r.stage(k).name());
    if (lead) {
      for (int k = first; k <= last; ++k) fs::remove_all(run + "/" + r.stage(k).name());
      write_json_atomic(spath, state);
    }
  }
  all.sync();
  for (int i = first; i <= last; ++i) {
    const Stage& s = r.stage(i);
    if (finished(s.name())) {
      spdlog::info("stage {} ({}): finished earlier, skipped", s.name(), StageKind_Name(s.kind()));
      continue;
    }
    // Inputs must be finished (they are unless --only skipped them).
    std::vector<std::string> deps;
    if (!s.init_from().empty()) deps.push_back(s.init_from());
    if (!s.data_from().empty()) deps.push_back(s.data_from());
    for (auto& d : s.average().stages()) deps.push_back(d);
    for (auto& d : post_stage_inputs(s)) deps.push_back(d);
    for (auto& d : deps)
      if (!finished(d)) fail("stage '{}' needs stage '{}', which has not finished in {}", s.name(), d, run);
    spdlog::info("stage {} ({}): starting", s.name(), StageKind_Name(s.kind()));
    const auto t0 = clock_type::now();
    if (lead && s.kind() == DATA) fs::remove_all(run + "/" + s.name());  // the builder is not resumable
    // A stage with a multi-rank layout runs on every rank; any other on rank 0 alone.
    const bool on_all = is_training(s.kind()) && layout_of(s).world() > 1;
    json f;
    if (on_all || lead) f = StageRunner(lr, i, opts).run();
    const double secs = std::chrono::duration<double>(clock_type::now() - t0).count();
    state["finished"].push_back(s.name());
    state["seconds"][s.name()] = state["seconds"].value(s.name(), 0.0) + secs;
    if (lead) {
      write_json_atomic(run + "/" + s.name() + "/final.json", f);
      write_json_atomic(spath, state);
    }
    all.sync();  // the next stage reads this one's outputs
    if (lead) spdlog::info("stage {} ({}): finished in {:.1f} s: {}", s.name(), StageKind_Name(s.kind()), secs, f.dump());
  }
  if (lead) std::cout << final_table(lr, run) << std::flush;
}

}  // namespace llama3::recipes
