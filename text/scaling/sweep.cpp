#include "text/scaling/sweep.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "runtime/core/error.h"
#include "runtime/io/checkpoint.h"
#include "text/data/build.h"
#include "text/model/llama.h"
#include "text/tokenizer/tokenizer.h"
#include "text/train/loader_source.h"
#include "text/train/trainer.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace llama3::scaling {

bool ModelShape::runs_at(double budget) const {
  return budgets.empty() || std::any_of(budgets.begin(), budgets.end(), [&](double b) {
           return std::abs(b - budget) <= 1e-9 * budget;
         });
}

SweepConfig SweepConfig::from_json(const json& j, const std::string& where) {
  LLAMA3_CHECK(j.is_object(), "{}: expected a JSON object", where);
  static const std::vector<std::string> known = {
      "data",      "budgets",      "models",        "seq_len",      "batch",
      "lr",        "min_lr_ratio", "warmup_frac",   "weight_decay", "eval_batches",
      "min_steps", "seed",         "target_budget", "comment"};
  for (auto it = j.begin(); it != j.end(); ++it)
    LLAMA3_CHECK(
        std::find(known.begin(), known.end(), it.key()) != known.end(),
        "{}: unknown field '{}' (known: data, budgets, models, seq_len, batch, lr, min_lr_ratio, "
        "warmup_frac, weight_decay, eval_batches, min_steps, seed, target_budget)",
        where, it.key());
  SweepConfig c;
  auto get = [&](const char* k, auto& v) {
    if (!j.contains(k)) return;
    try {
      v = j[k].get<std::decay_t<decltype(v)>>();
    } catch (const std::exception& e) {
      fail("{}: field '{}': {}", where, k, e.what());
    }
  };
  get("data", c.data_dir);
  get("budgets", c.budgets);
  get("seq_len", c.seq_len);
  get("batch", c.batch);
  get("lr", c.lr);
  get("min_lr_ratio", c.min_lr_ratio);
  get("warmup_frac", c.warmup_frac);
  get("weight_decay", c.weight_decay);
  get("eval_batches", c.eval_batches);
  get("min_steps", c.min_steps);
  get("seed", c.seed);
  get("target_budget", c.target_budget);
  LLAMA3_CHECK(!c.data_dir.empty(), "{}: missing field 'data' (a directory with manifest.json)",
               where);
  LLAMA3_CHECK(!c.budgets.empty(), "{}: 'budgets' must list at least one compute budget in FLOPs",
               where);
  for (double b : c.budgets) LLAMA3_CHECK(b > 0, "{}: budget {} must be positive", where, b);
  LLAMA3_CHECK(j.contains("models") && j["models"].is_array() && !j["models"].empty(),
               "{}: 'models' must be a non-empty list of {{dim, n_layers, n_heads, n_kv_heads}}",
               where);
  for (size_t i = 0; i < j["models"].size(); ++i) {
    const json& m = j["models"][i];
    ModelShape s;
    s.dim = m.value("dim", s.dim);
    s.n_layers = m.value("n_layers", s.n_layers);
    s.n_heads = m.value("n_heads", s.n_heads);
    s.n_kv_heads = m.value("n_kv_heads", s.n_kv_heads);
    if (m.contains("budgets")) {
      try {
        s.budgets = m["budgets"].get<std::vector<double>>();
      } catch (const std::exception& e) {
        fail("{}: models[{}].budgets: {}", where, i, e.what());
      }
      for (double b : s.budgets)
        LLAMA3_CHECK(std::any_of(c.budgets.begin(), c.budgets.end(),
                                 [&](double x) { return std::abs(x - b) <= 1e-9 * x; }),
                     "{}: models[{}].budgets lists {:.6g}, which is not one of 'budgets'", where, i,
                     b);
    }
    LLAMA3_CHECK(
        s.dim > 0 && s.n_layers > 0 && s.n_heads > 0 && s.dim % s.n_heads == 0 &&
            s.n_kv_heads > 0 && s.n_heads % s.n_kv_heads == 0,
        "{}: models[{}]: dim {} / n_heads {} / n_kv_heads {} must be positive and divide evenly",
        where, i, s.dim, s.n_heads, s.n_kv_heads);
    c.models.push_back(s);
  }
  LLAMA3_CHECK(c.seq_len > 0 && c.batch > 0 && c.eval_batches > 0,
               "{}: seq_len {}, batch {}, eval_batches {} must be positive", where, c.seq_len,
               c.batch, c.eval_batches);
  return c;
}

json SweepConfig::to_json() const {
  json ms = json::array();
  for (const auto& m : models) {
    ms.push_back({{"dim", m.dim},
                  {"n_layers", m.n_layers},
                  {"n_heads", m.n_heads},
                  {"n_kv_heads", m.n_kv_heads}});
    if (!m.budgets.empty()) ms.back()["budgets"] = m.budgets;
  }
  return {{"data", data_dir},
          {"budgets", budgets},
          {"models", ms},
          {"seq_len", seq_len},
          {"batch", batch},
          {"lr", lr},
          {"min_lr_ratio", min_lr_ratio},
          {"warmup_frac", warmup_frac},
          {"weight_decay", weight_decay},
          {"eval_batches", eval_batches},
          {"min_steps", min_steps},
          {"seed", seed},
          {"target_budget", target_budget}};
}

std::vector<SweepRun> read_sweep(const std::string& path, SweepConfig* cfg) {
  const json j = io::read_json(path);
  LLAMA3_CHECK(j.contains("runs") && j["runs"].is_array(), "{}: missing list 'runs'", path);
  std::vector<SweepRun> runs;
  for (size_t i = 0; i < j["runs"].size(); ++i)
    runs.push_back(sweep_run_from_json(j["runs"][i], fmt::format("{}: runs[{}]", path, i)));
  if (cfg && j.contains("config")) *cfg = SweepConfig::from_json(j["config"], path + ": config");
  return runs;
}

namespace {

std::string resolve(const std::string& p, const std::string& base) {
  return fs::path(p).is_relative() && !fs::exists(p) ? (fs::path(base) / p).string() : p;
}

// The math documents of the demo's held-out eval split (text/eval.jsonl lines with
// "source": "math"), tokenised once into out_dir/math_eval.shard. Empty if unavailable.
std::string held_out_math_shard(const std::string& data_dir, const json& manifest,
                                const std::string& out_dir) {
  const fs::path eval_jsonl = fs::path(data_dir) / "text" / "eval.jsonl";
  if (!fs::exists(eval_jsonl) || !manifest.contains("tokenizer")) return "";
  const std::string shard = (fs::path(out_dir) / "math_eval.shard").string();
  if (fs::exists(shard)) return shard;
  const std::string jl = (fs::path(out_dir) / "math_eval.jsonl").string();
  int64_t n = 0;
  {
    std::ifstream in(eval_jsonl);
    std::ofstream out(jl, std::ios::trunc);
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      const json d = json::parse(line);
      if (d.value("source", "") == "math") out << line << '\n', ++n;
    }
  }
  if (n == 0) return "";
  const auto tok =
      text::Tokenizer::load(resolve(manifest["tokenizer"].get<std::string>(), data_dir));
  data::tokenize_jsonl(tok, jl, shard);
  return shard;
}

std::string run_key(double budget, const ModelShape& m) {
  return fmt::format("{:.6g}/{}/{}/{}/{}", budget, m.dim, m.n_layers, m.n_heads, m.n_kv_heads);
}

}  // namespace

std::vector<SweepRun> run_sweep(const SweepConfig& cfg, const SweepOptions& opts) {
  auto say = [&](const std::string& s) {
    if (opts.log) opts.log(s);
  };
  fs::create_directories(opts.out_dir);
  const std::string manifest_path = (fs::path(cfg.data_dir) / "manifest.json").string();
  const json manifest = io::read_json(manifest_path);
  LLAMA3_CHECK(manifest.contains("vocab_size"), "{}: missing field 'vocab_size'", manifest_path);
  LLAMA3_CHECK(manifest.contains("eval"),
               "{}: missing field 'eval' (the held-out shard the sweep scores on)", manifest_path);

  data::LoaderConfig lc;
  lc.sources = data::read_manifest_sources(manifest_path);
  lc.seq_len = cfg.seq_len;
  lc.batch_size = cfg.batch;
  auto eval_cfg = [&](std::vector<std::string> shards) {
    data::LoaderConfig ec = lc;
    for (auto& s : shards) s = resolve(s, cfg.data_dir);
    ec.sources = {data::SourceSpec{"eval", shards, 1.0}};
    ec.seed = 12345;
    return ec;
  };
  const data::LoaderConfig eval_lc =
      eval_cfg(manifest["eval"]["shards"].get<std::vector<std::string>>());
  const std::string math_shard = held_out_math_shard(cfg.data_dir, manifest, opts.out_dir);
  if (math_shard.empty()) say("no held-out math documents found; math_loss is not recorded");

  // Resume: keep runs of an earlier sweep.json written with the same config.
  const std::string sweep_path = (fs::path(opts.out_dir) / "sweep.json").string();
  std::vector<SweepRun> runs;
  std::vector<std::string> keys;
  json doc = {{"config", cfg.to_json()}, {"runs", json::array()}};
  if (fs::exists(sweep_path)) {
    const json old = io::read_json(sweep_path);
    if (old.contains("config") && old["config"] == doc["config"] && old.contains("runs")) {
      doc["runs"] = old["runs"];
      for (const auto& r : old["runs"]) keys.push_back(r.value("key", ""));
      runs = read_sweep(sweep_path);
      say(fmt::format("resuming: {} runs already in {}", runs.size(), sweep_path));
    }
  }

  for (double budget : cfg.budgets) {
    for (const auto& shape : cfg.models) {
      if (!shape.runs_at(budget)) continue;
      const std::string key = run_key(budget, shape);
      if (std::find(keys.begin(), keys.end(), key) != keys.end()) continue;
      text::LlamaConfig mc;
      mc.dim = shape.dim, mc.n_layers = shape.n_layers, mc.n_heads = shape.n_heads,
      mc.n_kv_heads = shape.n_kv_heads;
      mc.vocab_size = manifest["vocab_size"].get<int64_t>();
      mc.multiple_of = 16;
      mc.max_seq_len = cfg.seq_len;
      mc.validate();
      const double fpt = mc.flops_per_token(cfg.seq_len);
      const double tokens_per_step = double(cfg.batch * cfg.seq_len);
      const int64_t steps = int64_t(std::llround(budget / fpt / tokens_per_step));
      if (steps < cfg.min_steps) {
        say(fmt::format("skip C={:.3g} dim {} layers {}: {} steps < min_steps {}", budget,
                        shape.dim, shape.n_layers, steps, cfg.min_steps));
        continue;
      }
      text::LlamaModel model(mc, cfg.seed);
      data::LoaderConfig tlc = lc;
      tlc.seed = cfg.seed + 1;
      text::LoaderSource train(tlc);
      text::LoaderSource eval(eval_lc);
      text::TrainerConfig tc;
      tc.steps = steps;
      tc.adamw.lr = float(cfg.lr);
      tc.adamw.weight_decay = float(cfg.weight_decay);
      tc.adamw.max_grad_norm = 1.0f;
      tc.schedule.peak = float(cfg.lr);
      tc.schedule.min_lr = float(cfg.lr * cfg.min_lr_ratio);
      tc.schedule.warmup = std::max<int64_t>(1, int64_t(double(steps) * cfg.warmup_frac));
      tc.schedule.total = steps;
      tc.schedule.decay = optim::Decay::cosine;
      tc.eval_every = 0;
      tc.eval_batches = cfg.eval_batches;
      text::Trainer trainer(model, tc, train, &eval);
      const auto t0 = std::chrono::steady_clock::now();
      double last_loss = 0;
      for (int64_t s = 0; s < steps; ++s) last_loss = trainer.step().loss;
      SweepRun r;
      r.budget = budget;
      r.flops_per_token = fpt;
      r.tokens = double(trainer.tokens_seen());
      r.flops = r.tokens * fpt;
      r.params = double(mc.num_params());
      r.dim = mc.dim, r.n_layers = mc.n_layers;
      r.eval_loss = trainer.evaluate();
      if (!math_shard.empty()) {
        text::LoaderSource math(eval_cfg({math_shard}));
        text::Trainer scorer(model, tc, train, &math);  // only its evaluate() is used
        r.math_loss = scorer.evaluate();
      }
      r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      say(
          fmt::format("C={:.3g} dim {:>4} layers {}  params {:.3f}M  tokens {:.3g} ({} steps)  "
                      "train {:.4f}  eval "
                      "{:.4f}  math {:.4f}  {:.1f} s",
                      budget, mc.dim, mc.n_layers, r.params / 1e6, r.tokens, steps, last_loss,
                      r.eval_loss, r.math_loss, r.seconds));
      runs.push_back(r);
      keys.push_back(key);
      json rj = to_json(r);
      rj["key"] = key;
      rj["n_heads"] = shape.n_heads;
      rj["n_kv_heads"] = shape.n_kv_heads;
      rj["steps"] = steps;
      rj["final_train_loss"] = last_loss;
      doc["runs"].push_back(rj);
      const std::string tmp = sweep_path + ".tmp";
      std::ofstream(tmp, std::ios::trunc) << doc.dump(2) << '\n';
      fs::rename(tmp, sweep_path);
    }
  }
  return runs;
}

}  // namespace llama3::scaling
