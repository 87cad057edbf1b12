#include "text/tokenizer/utf8.h"

#include <cstdint>
#include <cstring>

namespace llama3::text::utf8 {
namespace {

// Length of the well-formed sequence at s[i] (1..4), or 0 if ill-formed. When ill-formed,
// *maximal is the length of the maximal subpart (at least 1) to replace with one U+FFFD.
size_t sequence_length(std::string_view s, size_t i, size_t* maximal) {
  const auto at = [&](size_t k) -> int {
    return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : -1;
  };
  const int c = at(0);
  size_t need;
  int lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3;
    if (c == 0xE0) lo = 0xA0;  // overlong
    if (c == 0xED) hi = 0x9F;  // surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4;
    if (c == 0xF0) lo = 0x90;  // overlong
    if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    *maximal = 1;
    return 0;
  }
  for (size_t k = 1; k < need; ++k) {
    const int b = at(k);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) {
      *maximal = k;
      return 0;
    }
  }
  return need;
}

}  // namespace

size_t find_invalid(std::string_view s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    // ASCII fast path: 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t maximal = 0;
    const size_t len = sequence_length(s, i, &maximal);
    if (len == 0) return i;
    i += len;
  }
  return kValid;
}

std::string replace_invalid(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    size_t maximal = 0;
    const size_t len = sequence_length(s, i, &maximal);
    if (len) {
      out.append(s.data() + i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      i += maximal;
    }
  }
  return out;
}

}  // namespace llama3::text::utf8
