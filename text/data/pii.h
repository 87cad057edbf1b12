// PII detection for curation (paper 3.1.1, "PII and safety filtering"): e-mail addresses,
// phone numbers, IPv4/IPv6 addresses and credit-card-like numbers (Luhn-checked), found with
// JIT-compiled PCRE2 patterns and replaced by placeholders such as "[EMAIL]".
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace llama3::data {

struct PiiCounts {
  int64_t email = 0, phone = 0, ip = 0, credit_card = 0;
  int64_t total() const { return email + phone + ip + credit_card; }
};

struct PiiKinds {
  bool email = true, phone = true, ip = true, credit_card = true;
};

// True when the digits (separators ignored) pass the Luhn checksum used by card numbers.
bool luhn_valid(std::string_view digits);

class PiiScanner {
 public:
  explicit PiiScanner(const PiiKinds& kinds = {});
  ~PiiScanner();
  PiiScanner(PiiScanner&&) noexcept;
  // Replaces every match with its placeholder and returns what was found.
  PiiCounts redact(std::string& text) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace llama3::data
