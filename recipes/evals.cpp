#include "recipes/evals.h"

#include <cmath>
#include <filesystem>
#include <random>
#include <set>
#include <span>
#include <unordered_map>

#include "runtime/autograd/autograd.h"
#include "runtime/core/error.h"
#include "runtime/io/checkpoint.h"
#include "text/data/shard.h"
#include "text/train/trainer.h"

namespace llama3::recipes {

double eval_loss(const text::LlamaModel& model, const std::vector<data::SourceSpec>& eval_sources,
                 int64_t seq_len, int64_t batch_size, int64_t batches) {
  LLAMA3_CHECK(batches > 0, "eval: batches must be > 0");
  data::LoaderConfig c;
  c.sources = eval_sources;
  c.seq_len = seq_len;
  c.batch_size = batch_size;
  c.seed = 12345;  // the same batches every time
  c.prefetch = 1;
  data::MixingLoader loader(c);
  autograd::NoGradGuard ng;
  double sum = 0;
  for (int64_t i = 0; i < batches; ++i) {
    text::BatchTensors bt = text::to_tensors(loader.next());
    sum += model.loss(bt.tokens, bt.targets, bt.doc_ids).item();
  }
  return sum / double(batches);
}

double unigram_entropy(const std::vector<std::string>& shards) {
  std::unordered_map<int32_t, int64_t> counts;
  int64_t n = 0;
  for (auto& p : shards) {
    data::Shard s = data::Shard::load(p);
    for (int64_t d = 0; d < s.n_docs(); ++d)
      for (int32_t t : s.doc(d)) ++counts[t], ++n;
  }
  LLAMA3_CHECK(n > 0, "unigram entropy: no tokens in the eval shards");
  double h = 0;
  for (auto& [t, c] : counts) {
    const double p = double(c) / double(n);
    h -= p * std::log(p);
  }
  return h;
}

Needles::Needles(const text::Tokenizer& tok, const std::vector<std::string>& filler_shards, int key_digits)
    : tok_(tok), key_digits_(key_digits) {
  LLAMA3_CHECK(key_digits >= 1 && key_digits <= 6, "needles: key_digits {} must lie in [1, 6]", key_digits);
  for (auto& p : filler_shards) {
    data::Shard s = data::Shard::load(p);
    for (int64_t d = 0; d < s.n_docs(); ++d)
      for (int32_t t : s.doc(d))
        if (t < tok.bos_id()) filler_.push_back(t);
  }
  LLAMA3_CHECK(filler_.size() > 4096, "needles: only {} filler tokens", filler_.size());
}

Needles::Prompt Needles::prompt(int64_t length, int candidates, uint64_t seed) const {
  std::mt19937_64 rng(seed);
  auto key_text = [&](int k) {
    std::string s = " ";  // (appending, not " " + to_string: GCC 12 warns -Wrestrict there)
    return s += std::to_string(k);
  };
  // Keys are uniform over the key_digits-digit numbers (one digit: 0..9), distractors too.
  int lo_k = 1;
  for (int i = 1; i < key_digits_; ++i) lo_k *= 10;
  if (key_digits_ == 1) lo_k = 0;
  const int n_k = key_digits_ == 1 ? 10 : 9 * lo_k;
  LLAMA3_CHECK(candidates <= n_k, "needles: {} candidates but only {} {}-digit keys", candidates, n_k, key_digits_);
  const int key = lo_k + int(rng() % uint64_t(n_k));
  const std::vector<int32_t> needle = tok_.encode("\nThe pass key is" + key_text(key) + ". Remember it.\n");
  const std::vector<int32_t> question = tok_.encode("\nWhat is the pass key? The pass key is");
  Prompt p;
  const std::vector<int32_t> ans = tok_.encode(key_text(key));
  std::set<int> used{key};
  // BPE splits 4-digit numbers unevenly ([80][6][4] vs [6][70][0]); a model's prior over
  // those splits would decide between candidates of different shapes whatever the context
  // says, so distractors take the key's shape (characters per token) where one exists.
  auto shape = [&](const std::vector<int32_t>& v) {
    std::vector<size_t> sh;
    for (int32_t t : v) sh.push_back(tok_.decode(std::span<const int32_t>(&t, 1)).size());
    return sh;
  };
  const std::vector<size_t> ans_shape = shape(ans);
  p.answer = int(rng() % uint64_t(candidates));
  for (int c = 0; c < candidates; ++c) {
    if (c == p.answer) {
      p.candidates.push_back(ans);
      continue;
    }
    for (int tries = 0;; ++tries) {
      const int k = lo_k + int(rng() % uint64_t(n_k));
      auto enc = tok_.encode(key_text(k));
      if (used.count(k) || (enc.size() != ans.size() && tries < 2000) || (shape(enc) != ans_shape && tries < 1000))
        continue;
      LLAMA3_CHECK(enc.size() == ans.size(), "needles: no distractor with {} tokens", ans.size());
      used.insert(k);
      p.candidates.push_back(enc);
      break;
    }
  }
  const int64_t n_fill = length - 1 - int64_t(needle.size() + question.size() + ans.size());
  LLAMA3_CHECK(n_fill >= 8, "needles: length {} is too short for the needle and question", length);
  const int64_t start = int64_t(rng() % uint64_t(filler_.size() - size_t(n_fill)));
  const int64_t depth = int64_t(rng() % uint64_t(n_fill + 1));
  p.context.reserve(size_t(length));
  p.context.push_back(tok_.bos_id());
  p.context.insert(p.context.end(), filler_.begin() + start, filler_.begin() + start + depth);
  p.context.insert(p.context.end(), needle.begin(), needle.end());
  p.context.insert(p.context.end(), filler_.begin() + start + depth, filler_.begin() + start + n_fill);
  p.context.insert(p.context.end(), question.begin(), question.end());
  return p;
}

void Needles::write_training_shard(const std::string& path, int64_t docs, int64_t min_len, int64_t max_len,
                                   uint64_t seed) const {
  std::mt19937_64 rng(seed);
  data::ShardWriter w(path, uint32_t(tok_.vocab_size()));
  for (int64_t d = 0; d < docs; ++d) {
    const int64_t len = min_len + int64_t(rng() % uint64_t(max_len - min_len + 1));
    Prompt p = prompt(len, 1, rng());
    std::vector<int32_t> doc = p.context;
    doc.insert(doc.end(), p.candidates[0].begin(), p.candidates[0].end());
    doc.push_back(tok_.eos_id());
    w.add(doc);
  }
  w.finish();
}

NiahResult niah_eval(const text::LlamaModel& model, const Needles& needles, int64_t length, int64_t samples,
                     int candidates, uint64_t seed) {
  autograd::NoGradGuard ng;
  NiahResult r;
  r.length = length;
  for (int64_t s = 0; s < samples; ++s) {
    Needles::Prompt p = needles.prompt(length, candidates, seed * 1000003 + uint64_t(s));
    const int64_t A = int64_t(p.candidates[0].size()), T = int64_t(p.context.size()) + A;
    std::vector<int32_t> toks;
    toks.reserve(size_t(candidates * T));
    for (auto& c : p.candidates) {
      toks.insert(toks.end(), p.context.begin(), p.context.end());
      toks.insert(toks.end(), c.begin(), c.end());
    }
    Tensor logits = model.logits(Tensor::from_vector(toks, {int64_t(candidates), T})).to(DType::f32).contiguous();
    const float* L = logits.data<float>();
    const int64_t V = logits.shape().back();
    int best = -1;
    double best_lp = -1e300;
    bool tie = false;
    for (int c = 0; c < candidates; ++c) {
      double lp = 0;
      for (int64_t j = 0; j < A; ++j) {
        const int64_t pos = T - A + j - 1;  // logits at pos predict token pos + 1
        const float* row = L + (int64_t(c) * T + pos) * V;
        double mx = row[0];
        for (int64_t v = 1; v < V; ++v) mx = std::max<double>(mx, row[v]);
        double z = 0;
        for (int64_t v = 0; v < V; ++v) z += std::exp(double(row[v]) - mx);
        lp += double(row[p.candidates[c][j]]) - mx - std::log(z);
      }
      if (lp > best_lp) {
        best_lp = lp, best = c, tie = false;
      } else if (lp == best_lp) {
        tie = true;
      }
    }
    ++r.samples;
    if (best == p.answer && !tie) ++r.correct;
  }
  return r;
}

void average_checkpoints(const std::vector<std::string>& inputs, std::vector<double> weights,
                         const std::string& out_dir) {
  LLAMA3_CHECK(!inputs.empty(), "average: no inputs");
  if (weights.empty()) weights.assign(inputs.size(), 1.0);
  LLAMA3_CHECK(weights.size() == inputs.size(), "average: {} weights for {} inputs", weights.size(),
               inputs.size());
  double sum = 0;
  for (double w : weights) {
    LLAMA3_CHECK(w >= 0, "average: weight {} must be >= 0", w);
    sum += w;
  }
  LLAMA3_CHECK(sum > 0, "average: weights sum to 0");
  nlohmann::json config;
  io::TensorMap first;
  std::map<std::string, std::vector<double>> acc;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string& dir = inputs[i];
    io::verify_checkpoint(dir);
    nlohmann::json cfg = io::read_json(dir + "/config.json");
    if (i == 0) config = cfg;
    const std::string path = dir + "/model.safetensors";
    io::TensorMap t = io::load_safetensors(path);
    if (i == 0) {
      first = t;
      for (auto& [name, ten] : t) acc[name].assign(size_t(ten.numel()), 0.0);
    } else {
      for (auto& [name, ten] : first)
        LLAMA3_CHECK(t.count(name), "average: {} lacks tensor '{}' (present in {})", path, name, inputs[0]);
      for (auto& [name, ten] : t) {
        auto it = first.find(name);
        LLAMA3_CHECK(it != first.end(), "average: {} has tensor '{}' which {} lacks", path, name, inputs[0]);
        LLAMA3_CHECK(it->second.shape() == ten.shape() && it->second.dtype() == ten.dtype(),
                     "average: tensor '{}' has shape {} in {} but {} in {}", name, shape_str(ten.shape()), path,
                     shape_str(it->second.shape()), inputs[0]);
      }
    }
    // Same tensors but another config (e.g. rope_theta) is a different model too.
    if (cfg != config)
      fail("average: {}/config.json differs from {}/config.json (architectures must match)", dir, inputs[0]);
    const double w = weights[i] / sum;
    for (auto& [name, ten] : t) {
      std::vector<double> v = ten.to_vector<double>();
      auto& a = acc[name];
      for (size_t k = 0; k < v.size(); ++k) a[k] += w * v[k];
    }
  }
  io::TensorMap out;
  for (auto& [name, ten] : first) {
    const auto& a = acc[name];
    std::vector<float> f(a.begin(), a.end());
    out[name] = Tensor::from_vector(f, ten.shape()).to(ten.dtype());
  }
  std::filesystem::create_directories(std::filesystem::path(out_dir).parent_path());
  io::CheckpointWriter w(out_dir);
  w.tensors("model.safetensors", out, {{"format", "pt"}});
  w.json("config.json", config);
  w.commit();
}

}  // namespace llama3::recipes
