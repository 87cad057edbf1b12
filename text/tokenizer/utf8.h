// UTF-8 helpers for the tokenizer: validation that reports the first bad byte offset,
// U+FFFD replacement, and code-point iteration (Llama 3's chunk limits count characters,
// not bytes, and its whitespace-run splitting uses Python's str.isspace()).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace llama3::text::utf8 {

inline constexpr size_t kValid = static_cast<size_t>(-1);

// Byte offset of the first byte that does not start a well-formed UTF-8 sequence
// (overlongs, surrogates and code points above U+10FFFF are ill-formed), or kValid.
size_t find_invalid(std::string_view s);

// Copy of s with every maximal ill-formed subsequence replaced by U+FFFD (the Unicode
// "substitution of maximal subparts" practice, as Python's errors="replace" does).
std::string replace_invalid(std::string_view s);

// Decodes the code point starting at s[i] of valid UTF-8 and returns its length in bytes.
inline size_t decode(std::string_view s, size_t i, char32_t& cp) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned char c = b(0);
  if (c < 0x80) {
    cp = c;
    return 1;
  }
  if (c < 0xE0) {
    cp = (char32_t(c & 0x1F) << 6) | (b(1) & 0x3F);
    return 2;
  }
  if (c < 0xF0) {
    cp = (char32_t(c & 0x0F) << 12) | (char32_t(b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    return 3;
  }
  cp = (char32_t(c & 0x07) << 18) | (char32_t(b(1) & 0x3F) << 12) | (char32_t(b(2) & 0x3F) << 6) |
       (b(3) & 0x3F);
  return 4;
}

// Python's str.isspace(): bidirectional class WS, B or S, or general category Zs.
inline bool python_isspace(char32_t c) {
  if (c < 0x80) return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20);
  switch (c) {
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return c >= 0x2000 && c <= 0x200A;
  }
}

}  // namespace llama3::text::utf8
