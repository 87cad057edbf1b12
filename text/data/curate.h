// Data curation (paper 3.1.1): a streaming pipeline of named stages over documents read
// from JSONL ({"text", "url", "source", ...}), plain-text or HTML files (.gz read
// transparently). Stages, in order: extract (HTML to text), normalize (UTF-8 repair,
// Unicode/whitespace), blocklist (domains, keywords), url_dedup, line_dedup, pii, minhash
// (near-duplicate documents), heuristics (length, duplicated n-grams, dirty words, KL
// outliers), quality / language / domain classifiers. Each stage counts what it kept,
// changed and dropped and why; the counts go to a JSON report and a summary table.
//
// Memory is bounded by the corpus' hashes, not its text: documents stream through in batches
// (stateless stages run on OpenMP threads, de-duplication checks in input order, so the output
// does not depend on the thread count); kept state is MinHash signatures, URL hashes, line-hash
// counts of one bucket and the frequent-line hashes of each bucket, and a hashed word histogram.
// Output is written to OUTPUT.tmp and renamed when the run completes, so an interrupted run leaves
// no partial output and a rerun (curation is deterministic) produces exactly the same file. The
// configuration's JSON fields are documented in docs/data.md.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "text/data/classifier.h"
#include "text/data/minhash.h"
#include "text/data/pii.h"

namespace llama3::data {

struct CurateInput {
  std::vector<std::string> paths;
  std::string format = "jsonl";  // jsonl | text | html (text/html: one document per file)
  std::string source;            // source for documents that do not name one
};

struct ClassifierSpec {
  bool enabled = false;
  std::string model;  // a saved HashedClassifier, or
  std::string train;  // labelled JSONL examples to train one from (saved to `model` if set)
  std::vector<std::string> only_sources;
  // quality: label counted as high quality and the minimum probability to keep a document
  std::string label = "hq";
  double min_score = 0.5;
  std::vector<std::string> keep;  // language: labels to keep (empty: label only)
  ClassifierOptions train_opts;   // used when training from `train`
};

struct CurateConfig {
  std::vector<CurateInput> inputs;
  std::string output;    // curated JSONL
  std::string report;    // JSON report (default: OUTPUT.report.json)
  std::string rejected;  // optional JSONL of dropped documents with stage and reason
  std::string invalid_utf8 = "replace";  // replace | drop | fail
  std::string invalid_json = "fail";     // fail | skip

  struct {
    bool enabled = true, keep_code = true, keep_math = true;
  } extract;
  struct {
    bool enabled = true;
  } normalize;
  struct {
    std::vector<std::string> domains, keywords;
  } blocklist;
  struct {
    bool enabled = true;
  } url_dedup;
  struct {
    bool enabled = true;
    int64_t bucket_docs = 100000;  // documents per bucket (input order)
    int64_t max_count = 6;         // a line seen more than this often in a bucket is removed
    int64_t min_chars = 1;         // shorter lines are never removed (e.g. "}" in code)
    std::vector<std::string> only_sources;
  } line_dedup;
  struct {
    bool enabled = true;
    std::string action = "redact";  // redact | drop
    PiiKinds kinds;
  } pii;
  struct {
    bool enabled = true;
    MinHashOptions opts;
  } minhash;
  struct {
    bool enabled = true;
    int64_t min_chars = 50, max_chars = 1000000, min_words = 5;
    int dup_ngram_n = 5;
    double max_dup_ngram_fraction = 0.5;  // of words covered by repeated n-grams
    std::vector<std::string> dirty_words;
    int64_t max_dirty_words = 2;  // more than this many occurrences drop the document
    double max_kl = 0;            // KL(doc || corpus) in nats above which to drop (0: off)
    int64_t kl_min_words = 50;    // shorter documents are not KL-tested (too noisy)
    std::vector<std::string> only_sources;
  } heuristics;
  ClassifierSpec quality, language, domain;

  static CurateConfig from_json(const nlohmann::json& j, const std::string& where);
  static CurateConfig load(const std::string& path);
};

struct StageStats {
  std::string name;
  int64_t in = 0, kept = 0, changed = 0, dropped = 0, skipped = 0;  // skipped: not applicable
  std::map<std::string, int64_t> dropped_by;                        // reason -> documents
  std::map<std::string, int64_t> found;       // e.g. "email" -> occurrences redacted
  std::map<std::string, double> sums, maxes;  // summed / maximum measurements (e.g. KL)
  nlohmann::json info = nlohmann::json::object();
};

struct CurateReport {
  int64_t docs_in = 0, docs_out = 0, bytes_in = 0, bytes_out = 0;
  double seconds = 0;
  std::vector<StageStats> stages;  // "read" first, then the pipeline stages
  nlohmann::json to_json() const;
  std::string table() const;  // the summary printed at the end of a run
  const StageStats* stage(const std::string& name) const;
};

// Runs the pipeline; writes config.output and config.report; returns the report.
CurateReport curate(const CurateConfig& config);

}  // namespace llama3::data
