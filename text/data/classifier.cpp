#include "text/data/classifier.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "runtime/core/error.h"
#include "text/data/text_clean.h"

namespace llama3::data {
namespace {
constexpr char kMagic[8] = {'L', '3', 'H', 'C', 'L', 'F', '1', '\0'};

void softmax(std::vector<double>& z) {
  double m = *std::max_element(z.begin(), z.end()), s = 0;
  for (auto& v : z) s += (v = std::exp(v - m));
  for (auto& v : z) v /= s;
}
}  // namespace

std::vector<uint32_t> HashedClassifier::features(std::string_view text) const {
  const uint32_t mask = (1u << o_.buckets_log2) - 1;
  std::vector<uint32_t> f;
  uint64_t prev = 0;
  bool have_prev = false;
  for_each_word(text, [&](std::string_view w) {
    uint64_t h = hash64(w, 1);
    f.push_back(uint32_t(h) & mask);
    if (o_.word_bigrams && have_prev) f.push_back(uint32_t(hash64(w, prev)) & mask);
    prev = h;
    have_prev = true;
    std::string b;  // built by appends: GCC 12 warns falsely (-Wrestrict) on "<" + string
    b.reserve(w.size() + 2);
    b.push_back('<');
    b.append(w);
    b.push_back('>');
    for (int n = o_.char_min; n <= o_.char_max; ++n)
      for (size_t i = 0; i + n <= b.size(); ++i)
        f.push_back(uint32_t(hash64(std::string_view(b).substr(i, n), 2)) & mask);
  });
  return f;
}

std::vector<double> HashedClassifier::predict(std::string_view text) const {
  const size_t L = labels_.size();
  std::vector<double> z(L, 0.0);
  auto f = features(text);
  if (f.empty()) return std::vector<double>(L, 1.0 / double(L));
  for (uint32_t k : f)
    for (size_t l = 0; l < L; ++l) z[l] += w_[size_t(k) * L + l];
  for (auto& v : z) v /= double(f.size());
  softmax(z);
  return z;
}

std::pair<std::string, double> HashedClassifier::top(std::string_view text) const {
  auto p = predict(text);
  size_t b = std::max_element(p.begin(), p.end()) - p.begin();
  return {labels_[b], p[b]};
}

int HashedClassifier::label_index(std::string_view label) const {
  for (size_t i = 0; i < labels_.size(); ++i)
    if (labels_[i] == label) return int(i);
  return -1;
}

double HashedClassifier::accuracy(const std::vector<LabelledText>& data) const {
  if (data.empty()) return 0;
  size_t ok = 0;
  for (const auto& ex : data) ok += top(ex.text).first == ex.label;
  return double(ok) / double(data.size());
}

HashedClassifier HashedClassifier::train(const std::vector<LabelledText>& data,
                                         const ClassifierOptions& o) {
  LLAMA3_CHECK(!data.empty(), "classifier: no training examples");
  LLAMA3_CHECK(o.buckets_log2 >= 8 && o.buckets_log2 <= 26,
               "classifier: buckets_log2 {} not in [8, 26]", o.buckets_log2);
  HashedClassifier c;
  c.o_ = o;
  std::vector<int> y;
  for (const auto& ex : data) {
    int k = c.label_index(ex.label);
    if (k < 0) {
      c.labels_.push_back(ex.label);
      k = int(c.labels_.size()) - 1;
    }
    y.push_back(k);
  }
  LLAMA3_CHECK(c.labels_.size() >= 2, "classifier: training needs at least 2 labels, got only '{}'",
               c.labels_[0]);
  const size_t L = c.labels_.size();
  c.w_.assign((size_t(1) << o.buckets_log2) * L, 0.f);
  std::vector<std::vector<uint32_t>> feats;
  for (const auto& ex : data) feats.push_back(c.features(ex.text));
  std::vector<size_t> order(data.size());
  std::iota(order.begin(), order.end(), 0);
  uint64_t rng = o.seed;
  const size_t total = size_t(o.epochs) * data.size();
  size_t step = 0;
  for (int ep = 0; ep < o.epochs; ++ep) {
    for (size_t i = order.size(); i > 1; --i) {
      rng = rng * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(order[i - 1], order[(rng >> 33) % i]);
    }
    for (size_t idx : order) {
      const auto& f = feats[idx];
      double lr = o.lr * (1.0 - double(step++) / double(total));  // linear decay, as fastText
      if (f.empty()) continue;
      std::vector<double> z(L, 0.0);
      for (uint32_t k : f)
        for (size_t l = 0; l < L; ++l) z[l] += c.w_[size_t(k) * L + l];
      for (auto& v : z) v /= double(f.size());
      softmax(z);
      // d loss / d w[k,l] = (p_l - [l == y]) / |f| for each occurrence of feature k.
      for (size_t l = 0; l < L; ++l) z[l] = (z[l] - (int(l) == y[idx] ? 1.0 : 0.0)) * lr;
      for (uint32_t k : f)
        for (size_t l = 0; l < L; ++l) c.w_[size_t(k) * L + l] -= float(z[l]);
    }
  }
  return c;
}

std::vector<LabelledText> HashedClassifier::read_examples(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail("classifier examples {}: cannot open", path);
  std::vector<LabelledText> out;
  std::string line;
  for (int64_t n = 1; std::getline(f, line); ++n) {
    if (line.empty()) continue;
    try {
      auto j = nlohmann::json::parse(line);
      out.push_back({j.at("text").get<std::string>(), j.at("label").get<std::string>()});
    } catch (const nlohmann::json::exception& e) {
      fail("classifier examples {}:{}: {}", path, n, e.what());
    }
  }
  if (out.empty()) fail("classifier examples {}: empty (no examples)", path);
  return out;
}

void HashedClassifier::save(const std::string& path) const {
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    LLAMA3_CHECK(f.good(), "classifier {}: cannot write", tmp);
    int32_t hdr[6] = {
        o_.buckets_log2, o_.char_min, o_.char_max, o_.word_bigrams, int32_t(labels_.size()), 0};
    f.write(kMagic, 8);
    f.write(reinterpret_cast<const char*>(hdr), sizeof hdr);
    for (const auto& l : labels_) {
      uint32_t n = uint32_t(l.size());
      f.write(reinterpret_cast<const char*>(&n), 4);
      f.write(l.data(), n);
    }
    f.write(reinterpret_cast<const char*>(w_.data()), std::streamsize(w_.size() * 4));
    LLAMA3_CHECK(f.good(), "classifier {}: write failed", tmp);
  }
  std::rename(tmp.c_str(), path.c_str());
}

HashedClassifier HashedClassifier::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("classifier {}: cannot open", path);
  char magic[8];
  int32_t hdr[6];
  if (!f.read(magic, 8) || std::memcmp(magic, kMagic, 8) != 0)
    fail("classifier {}: bad magic at offset 0", path);
  if (!f.read(reinterpret_cast<char*>(hdr), sizeof hdr))
    fail("classifier {}: truncated header", path);
  HashedClassifier c;
  c.o_.buckets_log2 = hdr[0];
  c.o_.char_min = hdr[1];
  c.o_.char_max = hdr[2];
  c.o_.word_bigrams = hdr[3] != 0;
  if (hdr[0] < 8 || hdr[0] > 26 || hdr[4] < 2 || hdr[4] > 4096)
    fail("classifier {}: implausible header (buckets_log2 {}, {} labels) at offset 8", path, hdr[0],
         hdr[4]);
  for (int i = 0; i < hdr[4]; ++i) {
    uint32_t n = 0;
    if (!f.read(reinterpret_cast<char*>(&n), 4) || n > 1024)
      fail("classifier {}: bad label {} at offset {}", path, i, int64_t(f.tellg()));
    std::string l(n, '\0');
    if (!f.read(l.data(), n)) fail("classifier {}: truncated in label {}", path, i);
    c.labels_.push_back(l);
  }
  c.w_.resize((size_t(1) << hdr[0]) * c.labels_.size());
  if (!f.read(reinterpret_cast<char*>(c.w_.data()), std::streamsize(c.w_.size() * 4)))
    fail("classifier {}: truncated weights (expected {} floats)", path, c.w_.size());
  return c;
}

}  // namespace llama3::data
