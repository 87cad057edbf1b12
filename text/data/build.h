// Building training data end to end: tokenising curated JSONL into shards, and the embedded
// default corpus (`llama3 data demo`) made on a fresh machine from what is installed there.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "text/data/loader.h"
#include "text/tokenizer/tokenizer.h"

namespace llama3::data {

struct TokenizeStats {
  int64_t docs = 0, tokens = 0;
};

// What tokenize_jsonl needs from a tokenizer; the overload below adapts text::Tokenizer.
// Kept separate so shard writing is testable with any encoder.
struct TextEncoder {
  std::function<std::vector<std::vector<int32_t>>(std::span<const std::string>)> encode_batch;
  int32_t bos_id = 0, eos_id = 0, vocab_size = 0;
};

// Encodes each JSONL line's "text" as BOS + tokens + EOS into one shard at out_path.
// Errors name the file and line (invalid JSON, missing text, invalid UTF-8 with its offset)
// and an input with no documents is an error.
TokenizeStats tokenize_jsonl(const TextEncoder& enc, const std::string& in_path,
                             const std::string& out_path);
TokenizeStats tokenize_jsonl(const text::Tokenizer& tok, const std::string& in_path,
                             const std::string& out_path);

// The sources of a manifest.json written by build_demo (name, shards, weight), ready for
// LoaderConfig::sources. Errors name the file and the field.
std::vector<SourceSpec> read_manifest_sources(const std::string& path);

struct DemoOptions {
  std::string out_dir;
  int32_t vocab_size = 4096;        // BPE base ranks (the 256 specials come on top)
  int64_t general_bytes = 1400000;  // raw bytes collected per source before curation
  int64_t code_bytes = 700000;
  int64_t math_problems = 3000;
  int64_t multilingual_bytes = 500000;
  int64_t eval_every = 20;  // every n-th curated document goes to the held-out eval shard
  uint64_t seed = 1;
};

// Collects prose (/usr/share/doc, English man pages), code (system headers, Python
// sources), generated arithmetic word problems with answers, and translated man pages;
// curates them; trains the default tokenizer; writes per-source shards and an eval shard,
// plus manifest.json describing them. Layout documented in docs/data.md. Returns the
// manifest as text (also written).
std::string build_demo(const DemoOptions& opts);

}  // namespace llama3::data
