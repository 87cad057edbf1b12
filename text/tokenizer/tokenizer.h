// Tokenizer: tiktoken-format byte-level BPE with the Llama 3 pre-tokenisation pattern and
// the 256 Llama 3 special tokens placed after the base ranks. This header is the contract
// the rest of the system (data shards, chat format, generation) codes against.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace llama3::text {

// How encode() treats special-token text such as "<|eot_id|>" found in the input.
enum class SpecialTokens {
  kDisallow,  // treated as ordinary text (the safe default for untrusted data)
  kAllow,     // recognised as the special token's id
};

// What encode() does with invalid UTF-8 input.
enum class InvalidUtf8 {
  kError,    // throw llama3::Error naming the byte offset
  kReplace,  // replace each invalid sequence with U+FFFD
};

struct EncodeOptions {
  SpecialTokens specials = SpecialTokens::kDisallow;
  InvalidUtf8 invalid_utf8 = InvalidUtf8::kError;
};

class Tokenizer {
 public:
  // Loads a tiktoken file (`base64(token) rank` per line). The 256 special tokens get ids
  // n_base .. n_base+255. Throws naming the file and line on malformed input.
  static Tokenizer load(const std::string& path);

  std::vector<int32_t> encode(std::string_view text, const EncodeOptions& opts = {}) const;
  // Many texts at once, split across OpenMP threads.
  std::vector<std::vector<int32_t>> encode_batch(std::span<const std::string> texts,
                                                 const EncodeOptions& opts = {}) const;
  // Exact inverse of encode for valid UTF-8 (bytes are concatenated; a partial UTF-8
  // sequence from a truncated id list is returned as raw bytes).
  std::string decode(std::span<const int32_t> ids) const;

  int32_t n_base() const;      // number of base (BPE) ranks
  int32_t vocab_size() const;  // n_base + 256
  int32_t special_id(std::string_view name) const;  // e.g. "<|eot_id|>"; throws if unknown
  int32_t bos_id() const { return n_base(); }        // <|begin_of_text|>
  int32_t eos_id() const { return n_base() + 1; }    // <|end_of_text|>
  bool is_special(int32_t id) const { return id >= n_base(); }

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct BpeTrainOptions {
  int32_t vocab_size = 8192;  // base ranks (256 byte tokens included); specials come on top
  size_t max_bytes = 0;       // read at most this many bytes of corpus (0 = all)
};

// Trains a byte-level BPE vocabulary on the files' text (pre-tokenised with the Llama 3
// pattern) and writes it in tiktoken format to out_path.
void train_bpe(std::span<const std::string> corpus_files, const BpeTrainOptions& opts,
               const std::string& out_path);

}  // namespace llama3::text
