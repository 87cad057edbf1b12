#define PCRE2_CODE_UNIT_WIDTH 8
#include "text/data/pii.h"

#include <pcre2.h>

#include <vector>

#include "runtime/core/error.h"

namespace llama3::data {
namespace {

struct Pattern {
  pcre2_code* code = nullptr;
  int64_t PiiCounts::*counter;
  const char* placeholder;
  bool luhn = false;  // the match must also pass the Luhn check
};

// Order matters: card numbers before phones (a card is also a long digit run), e-mails
// before IPs (hosts can be dotted quads).
constexpr const char* kEmail =
    R"([A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})";
constexpr const char* kCard = R"((?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d.-]))";
constexpr const char* kIp =
    R"((?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]))"
    R"(|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:]))";
constexpr const char* kPhone =
    R"((?<![\w+.-])(?:\+\d{1,3}[ .-]?\(?\d{1,4}\)?(?:[ .-]?\d{2,4}){2,3})"
    R"(|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w-]))";

// "4.5.0.1" is far more often a version number (Debian changelogs, release notes) than an
// address, so dotted quads of single digits are not treated as IPs.
bool version_like(std::string_view m) {
  if (m.find(':') != std::string_view::npos) return false;
  size_t run = 0;
  for (char c : m) {
    if (c == '.') {
      run = 0;
    } else if (++run > 1) {
      return false;
    }
  }
  return true;
}

}  // namespace

bool luhn_valid(std::string_view s) {
  int sum = 0, n = 0;
  for (size_t i = s.size(); i-- > 0;) {
    char c = s[i];
    if (c < '0' || c > '9') continue;
    int d = c - '0';
    if (n % 2 == 1) {
      d *= 2;
      if (d > 9) d -= 9;
    }
    sum += d;
    ++n;
  }
  return n >= 13 && n <= 19 && sum % 10 == 0;
}

struct PiiScanner::Impl {
  std::vector<Pattern> patterns;
  ~Impl() {
    for (auto& p : patterns) pcre2_code_free(p.code);
  }
};

PiiScanner::PiiScanner(const PiiKinds& kinds) : impl_(std::make_unique<Impl>()) {
  auto add = [&](const char* re, int64_t PiiCounts::*counter, const char* ph, bool luhn) {
    int err = 0;
    PCRE2_SIZE off = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(re), PCRE2_ZERO_TERMINATED,
                                     PCRE2_UTF, &err, &off, nullptr);
    if (!code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail("pii: pattern does not compile at offset {}: {}", off, reinterpret_cast<char*>(msg));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if unavailable
    impl_->patterns.push_back({code, counter, ph, luhn});
  };
  if (kinds.email) add(kEmail, &PiiCounts::email, "[EMAIL]", false);
  if (kinds.credit_card) add(kCard, &PiiCounts::credit_card, "[CARD]", true);
  if (kinds.ip) add(kIp, &PiiCounts::ip, "[IP]", false);
  if (kinds.phone) add(kPhone, &PiiCounts::phone, "[PHONE]", false);
}

PiiScanner::~PiiScanner() = default;
PiiScanner::PiiScanner(PiiScanner&&) noexcept = default;

PiiCounts PiiScanner::redact(std::string& text) const {
  PiiCounts counts;
  for (const auto& p : impl_->patterns) {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(p.code, nullptr);
    std::string out;
    size_t start = 0, copied = 0;
    bool changed = false;
    while (start <= text.size()) {
      int rc = pcre2_match(p.code, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), start,
                           PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc < 0) break;
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t b = ov[0], e = ov[1];
      if (e == b) {
        start = e + 1;
        continue;
      }
      std::string_view m = std::string_view(text).substr(b, e - b);
      if ((!p.luhn || luhn_valid(m)) && !(p.counter == &PiiCounts::ip && version_like(m))) {
        out.append(text, copied, b - copied);
        out += p.placeholder;
        copied = e;
        ++(counts.*p.counter);
        changed = true;
      }
      start = e;
    }
    pcre2_match_data_free(md);
    if (changed) {
      out.append(text, copied, std::string::npos);
      text = std::move(out);
    }
  }
  return counts;
}

}  // namespace llama3::data
