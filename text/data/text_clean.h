// Text extraction and cleaning for curation (paper 3.1.1): HTML to plain text that keeps
// code blocks and math, UTF-8 validation/repair, and whitespace/Unicode normalisation.
// Pure functions, so each is tested on its own and the curation stages stay thin.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace llama3::data {

// Byte offset of the first invalid UTF-8 sequence, or npos when the text is valid.
size_t find_invalid_utf8(std::string_view s);
// Replaces each invalid UTF-8 sequence with U+FFFD; returns how many were replaced.
size_t repair_utf8(std::string& s);

// True when the text looks like an HTML page (a doctype, <html> or <body> near the start).
bool looks_like_html(std::string_view s);

struct HtmlOptions {
  bool keep_code = true;  // <pre>/<code> content kept verbatim (whitespace preserved)
  bool keep_math =
      true;  // MathML alttext, MathJax <script type="math/tex">, math <img alt> kept as $...$
};

// HTML to text: drops <head>, <script>, <style>, <nav>, <footer>, <header>, <aside>,
// <noscript>, <form>, and elements whose class/id names boilerplate (nav, menu, header,
// footer, sidebar, cookie, breadcrumb, banner); block elements become line breaks; entities decoded.
std::string html_to_text(std::string_view html, const HtmlOptions& opts = {});

struct NormalizeStats {
  size_t chars_mapped = 0;   // Unicode spaces, fullwidth ASCII, ligatures mapped to ASCII
  size_t chars_removed = 0;  // control, zero-width, soft hyphen characters removed
};

// Normalises valid UTF-8: CRLF/CR to LF, control/zero-width characters removed, Unicode
// spaces to ' ', fullwidth ASCII and fi/fl ligatures to ASCII (the NFKC cases that matter
// for web text), interior runs of spaces/tabs collapsed (leading indentation kept for code),
// trailing spaces stripped, runs of blank lines collapsed to one, and the ends trimmed.
std::string normalize_text(std::string_view s, NormalizeStats* stats = nullptr);

// Lower-cased ASCII words (letters/digits; other bytes >= 0x80 are kept inside words so
// non-Latin scripts still split on spaces and punctuation).
template <typename F>
void for_each_word(std::string_view s, F&& fn) {
  std::string w;
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    bool word = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                c >= 0x80 || c == '_';
    if (word) {
      w.push_back(c >= 'A' && c <= 'Z' ? char(c + 32) : char(c));
    } else if (!w.empty()) {
      fn(std::string_view(w));
      w.clear();
    }
  }
  if (!w.empty()) fn(std::string_view(w));
}

// 64-bit hash of bytes (FNV-1a followed by a murmur finaliser), stable across builds.
inline uint64_t hash64(std::string_view s, uint64_t seed = 0) {
  uint64_t h = 1469598103934665603ull ^ seed;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  return h ^ (h >> 33);
}

}  // namespace llama3::data
