#include "text/data/curate.h"

#include <fmt/format.h>
#include <omp.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <unordered_map>
#include <unordered_set>

#include "runtime/core/error.h"
#include "text/data/text_clean.h"

namespace llama3::data {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------- configuration parsing

void check_keys(const json& j, const std::string& where, std::initializer_list<const char*> known) {
  if (!j.is_object()) fail("{}: expected a JSON object, got {}", where, j.type_name());
  for (auto it = j.begin(); it != j.end(); ++it) {
    bool ok = false;
    std::string list;
    for (const char* k : known) {
      ok |= it.key() == k;
      list += list.empty() ? k : std::string(", ") + k;
    }
    if (!ok) fail("{}: unknown field '{}' (known: {})", where, it.key(), list);
  }
}

template <typename T>
void get(const json& j, const char* key, T& out, const std::string& where) {
  if (!j.contains(key)) return;
  try {
    out = j.at(key).get<T>();
  } catch (const json::exception& e) {
    fail("{}.{}: {} (value {})", where, key, e.what(), j.at(key).dump());
  }
}

void one_of(const std::string& v, std::initializer_list<const char*> allowed,
            const std::string& where) {
  for (const char* a : allowed)
    if (v == a) return;
  std::string list;
  for (const char* a : allowed) list += list.empty() ? a : std::string(" | ") + a;
  fail("{}: '{}' is not one of {}", where, v, list);
}

ClassifierSpec parse_classifier(const json& j, const std::string& where) {
  ClassifierSpec c;
  check_keys(j, where,
             {"enabled", "model", "train", "only_sources", "label", "min_score", "keep",
              "buckets_log2", "epochs"});
  get(j, "buckets_log2", c.train_opts.buckets_log2, where);
  get(j, "epochs", c.train_opts.epochs, where);
  c.enabled = true;
  get(j, "enabled", c.enabled, where);
  get(j, "model", c.model, where);
  get(j, "train", c.train, where);
  get(j, "only_sources", c.only_sources, where);
  get(j, "label", c.label, where);
  get(j, "min_score", c.min_score, where);
  get(j, "keep", c.keep, where);
  if (c.enabled && c.model.empty() && c.train.empty()) fail("{}: needs 'model' or 'train'", where);
  return c;
}

// ---------------------------------------------------------------- documents and reading

struct Doc {
  std::string text, url, source;
  json meta = json::object();  // fields other than text/url/source, kept in the output
  std::string origin;          // "file:line" for messages
  int64_t index = 0;           // position in the input stream
  bool html = false;
  std::vector<uint32_t> sig;  // MinHash signature, computed in parallel before the serial check
};

// Reads lines or whole files, gunzipping when needed (zlib reads plain files as they are).
class GzFile {
 public:
  explicit GzFile(const std::string& path) : path_(path) {
    f_ = gzopen(path.c_str(), "rb");
    if (!f_) fail("input {}: cannot open", path);
    gzbuffer(f_, 1 << 16);
  }
  ~GzFile() { gzclose(f_); }
  bool line(std::string& out) {
    out.clear();
    char buf[1 << 14];
    for (;;) {
      if (!gzgets(f_, buf, sizeof buf)) {
        check();
        return !out.empty();
      }
      out += buf;
      if (!out.empty() && out.back() == '\n') {
        out.pop_back();
        if (!out.empty() && out.back() == '\r') out.pop_back();
        return true;
      }
    }
  }
  std::string all() {
    std::string out;
    char buf[1 << 16];
    int n;
    while ((n = gzread(f_, buf, sizeof buf)) > 0) out.append(buf, size_t(n));
    if (n < 0) check();
    return out;
  }

 private:
  void check() {
    int err = 0;
    const char* msg = gzerror(f_, &err);
    if (err != Z_OK && err != Z_BUF_ERROR) fail("input {}: read error: {}", path_, msg);
  }
  std::string path_;
  gzFile f_;
};

// Streams the configured inputs as documents; counts into the "read" stage.
class Reader {
 public:
  Reader(const CurateConfig& cfg, StageStats* stats) : cfg_(cfg), st_(stats) {}

  // Calls fn(doc) for each document, in a fixed order.
  void for_each(const std::function<void(Doc&)>& fn) {
    int64_t index = 0;
    for (const auto& in : cfg_.inputs) {
      for (const auto& path : in.paths) {
        int64_t seen = 0;  // documents in the file, dropped ones included
        if (in.format == "jsonl") {
          seen = read_jsonl(in, path, index, fn);
        } else {
          GzFile f(path);
          Doc d;
          d.text = f.all();
          d.origin = path;
          seen = d.text.find_first_not_of(" \t\r\n") != std::string::npos;
          if (!seen) fail("input {}: empty source (no text)", path);
          if (st_) st_->in++, bytes_ += int64_t(d.text.size());
          if (!check_utf8(d.text, path)) continue;
          d.url = "file://" + path;
          d.source = in.source;
          d.html = in.format == "html";
          d.index = index++;
          if (st_) st_->kept++;
          fn(d);
        }
        if (seen == 0) fail("input {}: empty source (no documents)", path);
      }
    }
  }
  int64_t bytes() const { return bytes_; }

 private:
  // Applies the invalid_utf8 policy; false when the document is dropped.
  bool check_utf8(std::string& s, const std::string& where) {
    size_t bad = find_invalid_utf8(s);
    if (bad == std::string::npos) return true;
    if (cfg_.invalid_utf8 == "fail") fail("{}: invalid UTF-8 at byte offset {}", where, bad);
    if (cfg_.invalid_utf8 == "drop") {
      if (st_) st_->dropped++, st_->dropped_by["invalid_utf8"]++;
      return false;
    }
    size_t n = repair_utf8(s);
    if (st_) st_->found["invalid_utf8_replaced"] += int64_t(n);
    return true;
  }

  // Returns the number of non-blank lines.
  int64_t read_jsonl(const CurateInput& in, const std::string& path, int64_t& index,
                     const std::function<void(Doc&)>& fn) {
    GzFile f(path);
    std::string line;
    int64_t seen = 0;
    for (int64_t n = 1; f.line(line); ++n) {
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      ++seen;
      if (st_) st_->in++, bytes_ += int64_t(line.size());
      std::string where = fmt::format("{}:{}", path, n);
      if (!check_utf8(line, where)) continue;
      Doc d;
      try {
        json j = json::parse(line);
        if (!j.is_object()) throw std::runtime_error("a line must be a JSON object");
        if (!j.contains("text") || !j["text"].is_string())
          throw std::runtime_error("missing string field \"text\"");
        d.text = j["text"].get<std::string>();
        if (j.contains("url") && j["url"].is_string()) d.url = j["url"].get<std::string>();
        d.source = j.contains("source") && j["source"].is_string() ? j["source"].get<std::string>()
                                                                   : in.source;
        d.html = j.value("html", false);
        for (auto it = j.begin(); it != j.end(); ++it)
          if (it.key() != "text" && it.key() != "url" && it.key() != "source" && it.key() != "html")
            d.meta[it.key()] = it.value();
      } catch (const std::exception& e) {
        if (cfg_.invalid_json == "fail") fail("{}: invalid JSONL line: {}", where, e.what());
        if (st_) st_->dropped++, st_->dropped_by["invalid_json"]++;
        continue;
      }
      d.origin = where;
      d.index = index++;
      if (st_) st_->kept++;
      fn(d);
    }
    return seen;
  }

  const CurateConfig& cfg_;
  StageStats* st_;
  int64_t bytes_ = 0;
};

// ---------------------------------------------------------------- stages

enum class Outcome { kKeep, kChange, kDrop };

// Where a stage records one document's findings: the (thread-local) stats and the reason
// when it drops the document.
struct Ctx {
  StageStats& st;
  std::string reason;
  Outcome drop(std::string r) {
    reason = std::move(r);
    return Outcome::kDrop;
  }
};

// Adds b's counts into a (counters and maps are sums, so merge order does not matter).
void merge(StageStats& a, const StageStats& b) {
  a.in += b.in, a.kept += b.kept, a.changed += b.changed, a.dropped += b.dropped;
  a.skipped += b.skipped;
  for (const auto& [k, v] : b.dropped_by) a.dropped_by[k] += v;
  for (const auto& [k, v] : b.found) a.found[k] += v;
  for (const auto& [k, v] : b.sums) a.sums[k] += v;
  for (const auto& [k, v] : b.maxes) a.maxes[k] = std::max(a.maxes[k], v);
}

class Stage {
 public:
  Stage(std::string name, std::vector<std::string> only = {}) : only_(std::move(only)) {
    st.name = std::move(name);
  }
  virtual ~Stage() = default;
  // Stages without cross-document state run on many documents at once (OpenMP); the
  // others (URL and MinHash de-duplication) see documents one by one in input order.
  virtual bool parallel() const { return true; }
  // Runs the stage on d, counting into `stats`; false (and *reason set) when d is dropped.
  bool run(Doc& d, StageStats& stats, std::string* reason) const {
    stats.in++;
    if (!only_.empty() && std::find(only_.begin(), only_.end(), d.source) == only_.end()) {
      stats.skipped++;
      return true;
    }
    Ctx c{stats, {}};
    switch (apply(d, c)) {
      case Outcome::kKeep:
        stats.kept++;
        return true;
      case Outcome::kChange:
        stats.changed++;
        return true;
      case Outcome::kDrop:
        stats.dropped++;
        stats.dropped_by[c.reason]++;
        if (reason) *reason = std::move(c.reason);
        return false;
    }
    return true;
  }
  // Per-document work of a serial stage that needs no shared state; runs in parallel first.
  virtual void prepare(Doc& d) const {}
  bool applies_to(const Doc& d) const {
    return only_.empty() || std::find(only_.begin(), only_.end(), d.source) != only_.end();
  }
  virtual void finish() {}
  StageStats st;  // totals

 protected:
  // const: parallel stages must not change shared state; serial ones use mutable members.
  virtual Outcome apply(Doc& d, Ctx& c) const = 0;
  std::vector<std::string> only_;
};

class ExtractStage : public Stage {
 public:
  explicit ExtractStage(const CurateConfig& c)
      : Stage("extract"), o_{c.extract.keep_code, c.extract.keep_math} {}
  Outcome apply(Doc& d, Ctx& c) const override {
    if (!d.html && !looks_like_html(d.text)) return Outcome::kKeep;
    d.text = html_to_text(d.text, o_);
    c.st.found["html_documents"]++;
    if (d.text.empty()) return c.drop("no_text_in_html");
    return Outcome::kChange;
  }

 private:
  HtmlOptions o_;
};

class NormalizeStage : public Stage {
 public:
  NormalizeStage() : Stage("normalize") {}
  Outcome apply(Doc& d, Ctx& c) const override {
    NormalizeStats ns;
    std::string t = normalize_text(d.text, &ns);
    c.st.found["chars_mapped"] += int64_t(ns.chars_mapped);
    c.st.found["chars_removed"] += int64_t(ns.chars_removed);
    if (t.empty()) return c.drop("empty");
    bool changed = t != d.text;
    d.text = std::move(t);
    return changed ? Outcome::kChange : Outcome::kKeep;
  }
};

std::string lower(std::string s) {
  for (auto& c : s)
    if (c >= 'A' && c <= 'Z') c = char(c + 32);
  return s;
}

std::string url_host(const std::string& url) {
  size_t p = url.find("://");
  p = p == std::string::npos ? 0 : p + 3;
  size_t e = url.find_first_of("/:?#", p);
  std::string host = lower(url.substr(p, e == std::string::npos ? std::string::npos : e - p));
  size_t at = host.find('@');
  return at == std::string::npos ? host : host.substr(at + 1);
}

class BlocklistStage : public Stage {
 public:
  explicit BlocklistStage(const CurateConfig& c) : Stage("blocklist") {
    for (auto& d : c.blocklist.domains) domains_.push_back(lower(d));
    for (auto& k : c.blocklist.keywords) keywords_.push_back(lower(k));
  }
  Outcome apply(Doc& d, Ctx& c) const override {
    if (!d.url.empty() && !domains_.empty()) {
      std::string host = url_host(d.url);
      for (const auto& dom : domains_) {
        if (host == dom || (host.size() > dom.size() && host.ends_with("." + dom)))
          return c.drop("blocked_domain");
      }
    }
    if (!keywords_.empty()) {
      std::string t = lower(d.text);
      for (const auto& k : keywords_) {
        for (size_t p = t.find(k); p != std::string::npos; p = t.find(k, p + 1)) {
          auto word = [&](size_t i) { return std::isalnum(static_cast<unsigned char>(t[i])) != 0; };
          bool left = p == 0 || !word(p - 1),
               right = p + k.size() >= t.size() || !word(p + k.size());
          if (left && right) return c.drop("blocked_keyword");
        }
      }
    }
    return Outcome::kKeep;
  }

 private:
  std::vector<std::string> domains_, keywords_;
};

class UrlDedupStage : public Stage {
 public:
  UrlDedupStage() : Stage("url_dedup") {}
  bool parallel() const override { return false; }
  Outcome apply(Doc& d, Ctx& c) const override {
    if (d.url.empty()) return Outcome::kKeep;
    if (!seen_.insert(hash64(d.url)).second) return c.drop("duplicate_url");
    return Outcome::kKeep;
  }
  void finish() override { st.info["urls_seen"] = seen_.size(); }

 private:
  mutable std::unordered_set<uint64_t> seen_;
};

template <typename F>
void for_each_line(std::string_view s, F&& fn) {
  size_t p = 0;
  while (p <= s.size()) {
    size_t e = s.find('\n', p);
    if (e == std::string_view::npos) e = s.size();
    fn(s.substr(p, e - p));
    p = e + 1;
  }
}

// Corpus statistics gathered in a first pass over the cleaned text: which lines are frequent
// in each bucket (line de-duplication) and the corpus word histogram (KL filter).
struct CorpusStats {
  static constexpr uint32_t kWordBuckets = 1u << 16;
  std::vector<std::unordered_set<uint64_t>> frequent_lines;  // per bucket
  std::vector<double> words = std::vector<double>(kWordBuckets, 0.0);
  double total_words = 0;
};

uint64_t line_key(std::string_view line) {
  size_t b = line.find_first_not_of(" \t"), e = line.find_last_not_of(" \t");
  return b == std::string_view::npos ? 0 : hash64(line.substr(b, e - b + 1), 7);
}

class LineDedupStage : public Stage {
 public:
  LineDedupStage(const CurateConfig& c, const CorpusStats& cs)
      : Stage("line_dedup", c.line_dedup.only_sources),
        bucket_docs_(c.line_dedup.bucket_docs),
        min_chars_(c.line_dedup.min_chars),
        cs_(cs) {}
  Outcome apply(Doc& d, Ctx& c) const override {
    size_t b = size_t(d.index / bucket_docs_);
    if (b >= cs_.frequent_lines.size() || cs_.frequent_lines[b].empty()) return Outcome::kKeep;
    const auto& freq = cs_.frequent_lines[b];
    std::string out;
    int64_t removed = 0;
    for_each_line(d.text, [&](std::string_view line) {
      bool dup = int64_t(line.size()) >= min_chars_ && freq.count(line_key(line));
      if (dup) {
        ++removed;
      } else {
        out.append(line);
        out.push_back('\n');
      }
    });
    if (!removed) return Outcome::kKeep;
    c.st.found["lines_removed"] += removed;
    out = normalize_text(out);
    if (out.empty()) return c.drop("all_lines_duplicated");
    d.text = std::move(out);
    return Outcome::kChange;
  }

 private:
  int64_t bucket_docs_, min_chars_;
  const CorpusStats& cs_;
};

class PiiStage : public Stage {
 public:
  explicit PiiStage(const CurateConfig& c)
      : Stage("pii"), scan_(c.pii.kinds), drop_(c.pii.action == "drop") {}
  Outcome apply(Doc& d, Ctx& c) const override {
    std::string t = d.text;
    PiiCounts n = scan_.redact(t);
    if (!n.total()) return Outcome::kKeep;
    c.st.found["email"] += n.email;
    c.st.found["phone"] += n.phone;
    c.st.found["ip"] += n.ip;
    c.st.found["credit_card"] += n.credit_card;
    if (drop_) return c.drop("pii");
    d.text = std::move(t);
    return Outcome::kChange;
  }

 private:
  PiiScanner scan_;
  bool drop_;
};

class MinHashStage : public Stage {
 public:
  explicit MinHashStage(const CurateConfig& c) : Stage("minhash"), mh_(c.minhash.opts) {}
  bool parallel() const override { return false; }
  void prepare(Doc& d) const override { d.sig = mh_.signature(d.text); }
  Outcome apply(Doc& d, Ctx& c) const override {
    bool kept = false;
    double sim = mh_.check_and_insert(d.sig, &kept);
    d.sig = {};
    if (!kept) return c.drop(sim >= 1.0 ? "exact_duplicate" : "near_duplicate");
    return Outcome::kKeep;
  }
  void finish() override { st.info["signatures_kept"] = mh_.size(); }

 private:
  mutable MinHashDedup mh_;
};

class HeuristicStage : public Stage {
 public:
  HeuristicStage(const CurateConfig& c, const CorpusStats& cs)
      : Stage("heuristics", c.heuristics.only_sources), h_(c.heuristics), cs_(cs) {
    for (auto& w : h_.dirty_words) dirty_.insert(lower(w));
  }
  Outcome apply(Doc& d, Ctx& c) const override {
    int64_t chars = int64_t(d.text.size());
    if (chars < h_.min_chars) return c.drop("too_short");
    if (chars > h_.max_chars) return c.drop("too_long");
    std::vector<uint64_t> words;
    int64_t dirty = 0;
    for_each_word(d.text, [&](std::string_view w) {
      words.push_back(hash64(w));
      if (!dirty_.empty() && dirty_.count(std::string(w))) ++dirty;
    });
    if (int64_t(words.size()) < h_.min_words) return c.drop("too_few_words");
    if (dirty > h_.max_dirty_words) return c.drop("dirty_words");
    if (dup_ngram_fraction(words) > h_.max_dup_ngram_fraction) return c.drop("duplicated_ngrams");
    if (h_.max_kl > 0 && int64_t(words.size()) >= h_.kl_min_words && cs_.total_words > 0) {
      double kl = kl_divergence(words);
      c.st.sums["kl"] += kl;
      c.st.sums["kl_tested"] += 1;
      c.st.maxes["kl"] = std::max(c.st.maxes["kl"], kl);
      if (kl > h_.max_kl) return c.drop("kl_outlier");
    }
    return Outcome::kKeep;
  }
  void finish() override {
    double n = st.sums["kl_tested"];
    if (n > 0)
      st.info["kl"] = {{"tested", n}, {"mean", st.sums["kl"] / n}, {"max", st.maxes["kl"]}};
  }

 private:
  // Fraction of words covered by n-grams that occur more than once in the document.
  double dup_ngram_fraction(const std::vector<uint64_t>& w) const {
    const size_t n = size_t(h_.dup_ngram_n);
    if (w.size() < 2 * n) return 0;
    std::unordered_map<uint64_t, int> count;
    std::vector<uint64_t> keys(w.size() - n + 1);
    for (size_t i = 0; i + n <= w.size(); ++i) {
      uint64_t k = 0;
      for (size_t j = 0; j < n; ++j) k = (k ^ w[i + j]) * 0x100000001B3ull + j;
      keys[i] = k;
      count[k]++;
    }
    std::vector<char> covered(w.size(), 0);
    for (size_t i = 0; i < keys.size(); ++i)
      if (count[keys[i]] > 1) std::fill(covered.begin() + i, covered.begin() + i + n, 1);
    return double(std::count(covered.begin(), covered.end(), 1)) / double(w.size());
  }
  // KL(p_doc || q_corpus) over hashed word buckets. q is smoothed with a small pseudo-count
  // (0.01 per bucket): add-one over 65536 buckets would swamp the counts of a small corpus.
  double kl_divergence(const std::vector<uint64_t>& w) const {
    std::unordered_map<uint32_t, double> p;
    for (uint64_t h : w) p[uint32_t(h % CorpusStats::kWordBuckets)] += 1;
    constexpr double kAlpha = 0.01;
    double kl = 0, n = double(w.size()),
           denom = cs_.total_words + kAlpha * CorpusStats::kWordBuckets;
    for (auto [k, c] : p) {
      double pk = c / n, qk = (cs_.words[k] + kAlpha) / denom;
      kl += pk * std::log(pk / qk);
    }
    return kl;
  }
  decltype(CurateConfig::heuristics) h_;
  const CorpusStats& cs_;
  std::unordered_set<std::string> dirty_;
};

HashedClassifier make_classifier(const ClassifierSpec& s) {
  if (!s.train.empty()) {
    auto ex = HashedClassifier::read_examples(s.train);
    auto c = HashedClassifier::train(ex, s.train_opts);
    if (!s.model.empty()) c.save(s.model);
    return c;
  }
  return HashedClassifier::load(s.model);
}

// kind: "quality" (drop below min_score of `label`), "language" (label "lang", drop labels
// not in keep), "domain" (label only).
class ClassifierStage : public Stage {
 public:
  ClassifierStage(std::string kind, const ClassifierSpec& s)
      : Stage(kind, s.only_sources), kind_(std::move(kind)), spec_(s), clf_(make_classifier(s)) {
    if (kind_ == "quality") {
      label_ = clf_.label_index(s.label);
      if (label_ < 0)
        fail("quality classifier: label '{}' is not one of the model's labels", s.label);
    }
  }
  Outcome apply(Doc& d, Ctx& c) const override {
    if (kind_ == "quality") {
      double p = clf_.predict(d.text)[size_t(label_)];
      d.meta["quality"] = std::round(p * 1000) / 1000;
      if (p < spec_.min_score) return c.drop("low_quality");
      return Outcome::kChange;
    }
    auto [label, p] = clf_.top(d.text);
    c.st.found["label:" + label]++;
    if (kind_ == "language") {
      d.meta["lang"] = label;
      if (!spec_.keep.empty() &&
          std::find(spec_.keep.begin(), spec_.keep.end(), label) == spec_.keep.end())
        return c.drop("language_not_kept");
    } else {
      d.meta["domain"] = label;
      if (label == d.source) c.st.found["label_matches_source"]++;
    }
    return Outcome::kChange;
  }

 private:
  std::string kind_;
  ClassifierSpec spec_;
  HashedClassifier clf_;
  int label_ = -1;
};

std::string atomic_target(const std::string& path) {
  return path + ".tmp";
}

}  // namespace

// ---------------------------------------------------------------- config

CurateConfig CurateConfig::from_json(const json& j, const std::string& where) {
  CurateConfig c;
  check_keys(j, where,
             {"inputs", "output", "report", "rejected", "invalid_utf8", "invalid_json", "extract",
              "normalize", "blocklist", "url_dedup", "line_dedup", "pii", "minhash", "heuristics",
              "quality", "language", "domain"});
  if (!j.contains("inputs") || !j["inputs"].is_array() || j["inputs"].empty())
    fail("{}: 'inputs' must be a non-empty array", where);
  for (size_t i = 0; i < j["inputs"].size(); ++i) {
    const auto& ij = j["inputs"][i];
    std::string w = fmt::format("{}.inputs[{}]", where, i);
    check_keys(ij, w, {"path", "paths", "format", "source"});
    CurateInput in;
    std::string p;
    get(ij, "path", p, w);
    if (!p.empty()) in.paths.push_back(p);
    std::vector<std::string> ps;
    get(ij, "paths", ps, w);
    in.paths.insert(in.paths.end(), ps.begin(), ps.end());
    if (in.paths.empty()) fail("{}: needs 'path' or 'paths'", w);
    get(ij, "format", in.format, w);
    one_of(in.format, {"jsonl", "text", "html"}, w + ".format");
    get(ij, "source", in.source, w);
    c.inputs.push_back(in);
  }
  get(j, "output", c.output, where);
  if (c.output.empty()) fail("{}: 'output' is required", where);
  c.report = c.output + ".report.json";
  get(j, "report", c.report, where);
  get(j, "rejected", c.rejected, where);
  get(j, "invalid_utf8", c.invalid_utf8, where);
  one_of(c.invalid_utf8, {"replace", "drop", "fail"}, where + ".invalid_utf8");
  get(j, "invalid_json", c.invalid_json, where);
  one_of(c.invalid_json, {"fail", "skip"}, where + ".invalid_json");
  if (j.contains("extract")) {
    const auto& s = j["extract"];
    std::string w = where + ".extract";
    check_keys(s, w, {"enabled", "keep_code", "keep_math"});
    get(s, "enabled", c.extract.enabled, w);
    get(s, "keep_code", c.extract.keep_code, w);
    get(s, "keep_math", c.extract.keep_math, w);
  }
  if (j.contains("normalize")) {
    check_keys(j["normalize"], where + ".normalize", {"enabled"});
    get(j["normalize"], "enabled", c.normalize.enabled, where + ".normalize");
  }
  if (j.contains("blocklist")) {
    const auto& s = j["blocklist"];
    std::string w = where + ".blocklist";
    check_keys(s, w, {"domains", "keywords"});
    get(s, "domains", c.blocklist.domains, w);
    get(s, "keywords", c.blocklist.keywords, w);
  }
  if (j.contains("url_dedup")) {
    check_keys(j["url_dedup"], where + ".url_dedup", {"enabled"});
    get(j["url_dedup"], "enabled", c.url_dedup.enabled, where + ".url_dedup");
  }
  if (j.contains("line_dedup")) {
    const auto& s = j["line_dedup"];
    std::string w = where + ".line_dedup";
    check_keys(s, w, {"enabled", "bucket_docs", "max_count", "min_chars", "only_sources"});
    get(s, "enabled", c.line_dedup.enabled, w);
    get(s, "bucket_docs", c.line_dedup.bucket_docs, w);
    get(s, "max_count", c.line_dedup.max_count, w);
    get(s, "min_chars", c.line_dedup.min_chars, w);
    get(s, "only_sources", c.line_dedup.only_sources, w);
    if (c.line_dedup.bucket_docs <= 0)
      fail("{}.bucket_docs: {} must be positive", w, c.line_dedup.bucket_docs);
  }
  if (j.contains("pii")) {
    const auto& s = j["pii"];
    std::string w = where + ".pii";
    check_keys(s, w, {"enabled", "action", "email", "phone", "ip", "credit_card"});
    get(s, "enabled", c.pii.enabled, w);
    get(s, "action", c.pii.action, w);
    one_of(c.pii.action, {"redact", "drop"}, w + ".action");
    get(s, "email", c.pii.kinds.email, w);
    get(s, "phone", c.pii.kinds.phone, w);
    get(s, "ip", c.pii.kinds.ip, w);
    get(s, "credit_card", c.pii.kinds.credit_card, w);
  }
  if (j.contains("minhash")) {
    const auto& s = j["minhash"];
    std::string w = where + ".minhash";
    check_keys(s, w, {"enabled", "shingle", "bands", "rows", "threshold", "seed"});
    get(s, "enabled", c.minhash.enabled, w);
    get(s, "shingle", c.minhash.opts.shingle, w);
    get(s, "bands", c.minhash.opts.bands, w);
    get(s, "rows", c.minhash.opts.rows, w);
    get(s, "threshold", c.minhash.opts.threshold, w);
    get(s, "seed", c.minhash.opts.seed, w);
  }
  if (j.contains("heuristics")) {
    const auto& s = j["heuristics"];
    std::string w = where + ".heuristics";
    auto& h = c.heuristics;
    check_keys(
        s, w,
        {"enabled", "min_chars", "max_chars", "min_words", "dup_ngram_n", "max_dup_ngram_fraction",
         "dirty_words", "max_dirty_words", "max_kl", "kl_min_words", "only_sources"});
    get(s, "enabled", h.enabled, w);
    get(s, "min_chars", h.min_chars, w);
    get(s, "max_chars", h.max_chars, w);
    get(s, "min_words", h.min_words, w);
    get(s, "dup_ngram_n", h.dup_ngram_n, w);
    get(s, "max_dup_ngram_fraction", h.max_dup_ngram_fraction, w);
    get(s, "dirty_words", h.dirty_words, w);
    get(s, "max_dirty_words", h.max_dirty_words, w);
    get(s, "max_kl", h.max_kl, w);
    get(s, "kl_min_words", h.kl_min_words, w);
    get(s, "only_sources", h.only_sources, w);
    if (h.dup_ngram_n <= 0) fail("{}.dup_ngram_n: {} must be positive", w, h.dup_ngram_n);
  }
  if (j.contains("quality")) c.quality = parse_classifier(j["quality"], where + ".quality");
  if (j.contains("language")) c.language = parse_classifier(j["language"], where + ".language");
  if (j.contains("domain")) c.domain = parse_classifier(j["domain"], where + ".domain");
  return c;
}

CurateConfig CurateConfig::load(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail("curation config {}: cannot open", path);
  json j;
  try {
    j = json::parse(f);
  } catch (const json::parse_error& e) {
    fail("curation config {}: invalid JSON at byte {}: {}", path, e.byte, e.what());
  }
  return from_json(j, path);
}

// ---------------------------------------------------------------- report

json CurateReport::to_json() const {
  json j;
  j["docs_in"] = docs_in;
  j["docs_out"] = docs_out;
  j["bytes_in"] = bytes_in;
  j["bytes_out"] = bytes_out;
  j["seconds"] = seconds;
  j["stages"] = json::array();
  for (const auto& s : stages) {
    j["stages"].push_back({{"name", s.name},
                           {"in", s.in},
                           {"kept", s.kept},
                           {"changed", s.changed},
                           {"dropped", s.dropped},
                           {"skipped", s.skipped},
                           {"dropped_by", s.dropped_by},
                           {"found", s.found},
                           {"info", s.info}});
  }
  return j;
}

const StageStats* CurateReport::stage(const std::string& name) const {
  for (const auto& s : stages)
    if (s.name == name) return &s;
  return nullptr;
}

std::string CurateReport::table() const {
  std::string t = fmt::format("{:<11} {:>8} {:>8} {:>8} {:>8} {:>8}  {}\n", "stage", "in", "kept",
                              "changed", "dropped", "skipped", "why");
  for (const auto& s : stages) {
    std::string why;
    for (const auto& [k, v] : s.dropped_by)
      why += fmt::format("{}{}={}", why.empty() ? "" : " ", k, v);
    for (const auto& [k, v] : s.found)
      if (v) why += fmt::format("{}{}:{}", why.empty() ? "" : " ", k, v);
    t += fmt::format("{:<11} {:>8} {:>8} {:>8} {:>8} {:>8}  {}\n", s.name, s.in, s.kept, s.changed,
                     s.dropped, s.skipped, why);
  }
  t += fmt::format("documents {} -> {}, bytes {} -> {}, {:.1f} s\n", docs_in, docs_out, bytes_in,
                   bytes_out, seconds);
  return t;
}

// ---------------------------------------------------------------- the run

namespace {

constexpr size_t kBatchDocs = 1024;  // documents in flight: bounds memory, feeds the threads

// Runs stages [first, last) over a batch's live documents. Runs of stateless stages go
// through the batch in one OpenMP loop (each document passes through the run of stages on
// one thread, with thread-local stats merged afterwards); a serial stage first has its
// per-document preparation done in that loop, then checks the documents in input order.
// The result equals running the documents one by one; fusing keeps parallel regions few,
// which matters on busy machines.
void run_stages(const std::vector<std::unique_ptr<Stage>>& stages, std::vector<Doc>& docs,
                std::vector<char>& alive, std::vector<std::string>& why,
                std::vector<int>& dead_at) {
  const int64_t n = int64_t(docs.size());
  const size_t threads = static_cast<size_t>(omp_get_max_threads());
  for (size_t k = 0; k < stages.size();) {
    size_t j = k;
    while (j < stages.size() && stages[j]->parallel()) ++j;
    Stage* serial = j < stages.size() ? stages[j].get() : nullptr;
    std::vector<std::vector<StageStats>> local(j - k, std::vector<StageStats>(threads));
    std::exception_ptr err;
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < n; ++i) {
      if (!alive[i]) continue;
      try {
        const size_t t = static_cast<size_t>(omp_get_thread_num());
        for (size_t m = k; m < j; ++m) {
          if (!stages[m]->run(docs[i], local[m - k][t], &why[i])) {
            alive[i] = 0;
            dead_at[i] = int(m);
            break;
          }
        }
        if (alive[i] && serial && serial->applies_to(docs[i])) serial->prepare(docs[i]);
      } catch (...) {
#pragma omp critical(llama3_curate_error)
        if (!err) err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
    for (size_t m = k; m < j; ++m)
      for (const auto& l : local[m - k]) merge(stages[m]->st, l);
    if (serial) {
      for (int64_t i = 0; i < n; ++i) {
        if (alive[i] && !serial->run(docs[i], serial->st, &why[i])) {
          alive[i] = 0;
          dead_at[i] = int(j);
        }
      }
      ++j;
    }
    k = j;
  }
}

}  // namespace

CurateReport curate(const CurateConfig& cfg) {
  auto t0 = std::chrono::steady_clock::now();
  CurateReport rep;
  CorpusStats cs;
  const auto& ld = cfg.line_dedup;
  const bool need_stats = ld.enabled || (cfg.heuristics.enabled && cfg.heuristics.max_kl > 0);
  auto applies = [](const std::vector<std::string>& only, const std::string& src) {
    return only.empty() || std::find(only.begin(), only.end(), src) != only.end();
  };

  if (need_stats) {
    // Pass 1: clean text as pass 2 will see it at line_dedup, and count.
    std::vector<std::unique_ptr<Stage>> clean;  // the stages before line_dedup that change text
    if (cfg.extract.enabled) clean.push_back(std::make_unique<ExtractStage>(cfg));
    if (cfg.normalize.enabled) clean.push_back(std::make_unique<NormalizeStage>());
    std::unordered_map<uint64_t, int64_t> counts;  // current bucket's line counts
    int64_t bucket = 0;
    auto close_bucket = [&] {
      if (cs.frequent_lines.size() <= size_t(bucket)) cs.frequent_lines.resize(size_t(bucket) + 1);
      for (auto [h, n] : counts)
        if (n > ld.max_count) cs.frequent_lines[size_t(bucket)].insert(h);
      counts.clear();
    };
    auto count = [&](const Doc& d) {
      if (ld.enabled && applies(ld.only_sources, d.source)) {
        if (d.index / ld.bucket_docs != bucket) {
          close_bucket();
          bucket = d.index / ld.bucket_docs;
        }
        std::unordered_set<uint64_t> in_doc;  // a line repeated inside one document counts once
        for_each_line(d.text, [&](std::string_view line) {
          if (int64_t(line.size()) < ld.min_chars) return;
          uint64_t key = line_key(line);
          if (key && in_doc.insert(key).second) counts[key]++;
        });
      }
      if (applies(cfg.heuristics.only_sources, d.source)) {
        for_each_word(d.text, [&](std::string_view w) {
          cs.words[hash64(w) % CorpusStats::kWordBuckets] += 1;
          cs.total_words += 1;
        });
      }
    };
    std::vector<Doc> batch;
    auto flush = [&] {
      std::vector<char> alive(batch.size(), 1);
      std::vector<std::string> why(batch.size());
      std::vector<int> dead_at(batch.size(), -1);
      run_stages(clean, batch, alive, why, dead_at);
      for (size_t i = 0; i < batch.size(); ++i)
        if (alive[i]) count(batch[i]);
      batch.clear();
    };
    Reader reader(cfg, nullptr);
    reader.for_each([&](Doc& d) {
      batch.push_back(std::move(d));
      if (batch.size() == kBatchDocs) flush();
    });
    flush();
    close_bucket();
  }

  StageStats read_stats;
  read_stats.name = "read";
  std::vector<std::unique_ptr<Stage>> stages;
  if (cfg.extract.enabled) stages.push_back(std::make_unique<ExtractStage>(cfg));
  if (cfg.normalize.enabled) stages.push_back(std::make_unique<NormalizeStage>());
  if (!cfg.blocklist.domains.empty() || !cfg.blocklist.keywords.empty())
    stages.push_back(std::make_unique<BlocklistStage>(cfg));
  if (cfg.url_dedup.enabled) stages.push_back(std::make_unique<UrlDedupStage>());
  if (ld.enabled) stages.push_back(std::make_unique<LineDedupStage>(cfg, cs));
  if (cfg.pii.enabled) stages.push_back(std::make_unique<PiiStage>(cfg));
  if (cfg.minhash.enabled) stages.push_back(std::make_unique<MinHashStage>(cfg));
  if (cfg.heuristics.enabled) stages.push_back(std::make_unique<HeuristicStage>(cfg, cs));
  if (cfg.quality.enabled)
    stages.push_back(std::make_unique<ClassifierStage>("quality", cfg.quality));
  if (cfg.language.enabled)
    stages.push_back(std::make_unique<ClassifierStage>("language", cfg.language));
  if (cfg.domain.enabled) stages.push_back(std::make_unique<ClassifierStage>("domain", cfg.domain));

  if (auto dir = std::filesystem::path(cfg.output).parent_path(); !dir.empty())
    std::filesystem::create_directories(dir);
  std::string tmp = atomic_target(cfg.output);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    LLAMA3_CHECK(out.good(), "curate: cannot write {}", tmp);
    Reader reader(cfg, &read_stats);
    std::ofstream rejected;
    if (!cfg.rejected.empty()) {
      rejected.open(cfg.rejected, std::ios::trunc);
      LLAMA3_CHECK(rejected.good(), "curate: cannot write {}", cfg.rejected);
    }
    std::vector<Doc> batch;
    auto flush = [&] {
      const size_t n = batch.size();
      std::vector<char> alive(n, 1);
      std::vector<std::string> why(n);
      std::vector<int> dead_at(n, -1);  // stage that dropped the document
      run_stages(stages, batch, alive, why, dead_at);
      for (size_t i = 0; i < n; ++i) {
        const Doc& d = batch[i];
        if (!alive[i]) {
          if (rejected.is_open())
            rejected << json({{"stage", stages[size_t(dead_at[i])]->st.name},
                              {"reason", why[i]},
                              {"origin", d.origin},
                              {"url", d.url},
                              {"source", d.source},
                              {"text", d.text}})
                            .dump()
                     << '\n';
          continue;
        }
        json j = d.meta;
        j["text"] = d.text;
        if (!d.url.empty()) j["url"] = d.url;
        if (!d.source.empty()) j["source"] = d.source;
        out << j.dump() << '\n';
        rep.docs_out++;
        rep.bytes_out += int64_t(d.text.size());
      }
      batch.clear();
    };
    reader.for_each([&](Doc& d) {
      batch.push_back(std::move(d));
      if (batch.size() == kBatchDocs) flush();
    });
    flush();
    out.flush();
    LLAMA3_CHECK(out.good(), "curate: write to {} failed (disk full?)", tmp);
    rep.bytes_in = reader.bytes();
  }
  std::filesystem::rename(tmp, cfg.output);  // the output appears only complete
  rep.docs_in = read_stats.in;
  rep.stages.push_back(read_stats);
  for (auto& s : stages) {
    s->finish();
    rep.stages.push_back(s->st);
  }
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::string rtmp = atomic_target(cfg.report);
  {
    std::ofstream r(rtmp, std::ios::trunc);
    LLAMA3_CHECK(r.good(), "curate: cannot write {}", rtmp);
    r << rep.to_json().dump(2) << '\n';
  }
  std::filesystem::rename(rtmp, cfg.report);
  return rep;
}

}  // namespace llama3::data
