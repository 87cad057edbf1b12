// Pre-tokenisation for the tokenizer and the BPE trainer: Llama 3's regex (PCRE2, JIT) and
// Llama 3's input limits (400,000-character chunks, runs of more than 25,000 whitespace or
// non-whitespace characters split), mirroring Meta's reference tokenizer.py so that our ids
// equal tiktoken's under Meta's wrapper.
#pragma once

#include <cstddef>
#include <string_view>
#include <vector>

namespace llama3::text {

// The Llama 3 pattern as published (Python/fancy-regex syntax), for documentation and for
// the Python references. Pretokenizer compiles an equivalent with \s spelled out as the
// Unicode White_Space set, so PCRE2's and Rust's notions of \s cannot drift apart.
inline constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

inline constexpr size_t kMaxEncodeChars = 400'000;      // Meta: TIKTOKEN_MAX_ENCODE_CHARS
inline constexpr size_t kMaxConsecutiveChars = 25'000;  // Meta: MAX_NO_WHITESPACES_CHARS

// Splits valid UTF-8 text the way Meta's Tokenizer.encode does before calling tiktoken:
// 400,000-code-point chunks, each cut by _split_whitespaces_or_nonwhitespaces(chunk, 25,000).
// Appends the pieces (views into text) to out; an empty text yields no pieces.
void split_llama3_limits(std::string_view text, std::vector<std::string_view>& out,
                         size_t max_chars = kMaxEncodeChars,
                         size_t max_consecutive = kMaxConsecutiveChars);

// The compiled Llama 3 regex. Thread-safe: match state lives in thread-local storage.
class Pretokenizer {
 public:
  Pretokenizer();
  ~Pretokenizer();
  Pretokenizer(const Pretokenizer&) = delete;
  Pretokenizer& operator=(const Pretokenizer&) = delete;

  // Appends every regex match of valid UTF-8 text (searched as its own subject, like
  // tiktoken's find_iter on one segment) to out.
  void split(std::string_view text, std::vector<std::string_view>& out) const;

 private:
  void* code_ = nullptr;  // pcre2_code_8*
};

}  // namespace llama3::text
