#include "text/tokenizer/tiktoken_file.h"

#include <charconv>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include "runtime/core/error.h"

namespace llama3::text {
namespace {

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int base64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

bool is_blank(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

}  // namespace

std::string base64_encode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    const uint32_t v = uint32_t(uint8_t(bytes[i])) << 16 | uint32_t(uint8_t(bytes[i + 1])) << 8 |
                       uint8_t(bytes[i + 2]);
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += kAlphabet[v & 63];
  }
  const size_t rest = bytes.size() - i;
  if (rest) {
    uint32_t v = uint32_t(uint8_t(bytes[i])) << 16;
    if (rest == 2) v |= uint32_t(uint8_t(bytes[i + 1])) << 8;
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
    out += rest == 2 ? kAlphabet[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

bool base64_decode(std::string_view text, std::string& out) {
  out.clear();
  if (text.empty() || text.size() % 4 != 0) return false;
  for (size_t i = 0; i < text.size(); i += 4) {
    const bool last = i + 4 == text.size();
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = text[i + k];
      if (c == '=' && last && k >= 2) {
        v[k] = 0;
        ++pad;
      } else {
        if (pad) return false;  // data after padding
        v[k] = base64_value(c);
        if (v[k] < 0) return false;
      }
    }
    const uint32_t w = uint32_t(v[0]) << 18 | uint32_t(v[1]) << 12 | uint32_t(v[2]) << 6 | v[3];
    out += static_cast<char>(w >> 16);
    if (pad < 2) out += static_cast<char>((w >> 8) & 0xFF);
    if (pad < 1) out += static_cast<char>(w & 0xFF);
  }
  return true;
}

TiktokenVocab read_tiktoken_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open tiktoken vocabulary", path);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string data = ss.str();

  std::vector<std::string> by_rank;
  std::vector<size_t> line_of_rank;  // 0 = rank not seen
  std::unordered_map<std::string, size_t> line_of_token;
  std::string token;
  size_t line_no = 0, pos = 0;
  while (pos < data.size()) {
    size_t eol = data.find('\n', pos);
    if (eol == std::string::npos) eol = data.size();
    std::string_view line(data.data() + pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    // Fields separated by blanks, as Python's str.split() (Meta's loader) splits them.
    std::vector<std::string_view> fields;
    for (size_t i = 0; i < line.size();) {
      while (i < line.size() && is_blank(line[i])) ++i;
      size_t j = i;
      while (j < line.size() && !is_blank(line[j])) ++j;
      if (j > i) fields.push_back(line.substr(i, j - i));
      i = j;
    }
    if (fields.empty()) continue;  // blank lines are skipped, as by Meta's loader
    if (fields.size() != 2)
      fail("{}:{}: expected `base64(token) rank`, found {} field(s)", path, line_no, fields.size());
    if (!base64_decode(fields[0], token))
      fail("{}:{}: invalid base64 token '{}'", path, line_no, fields[0]);
    int64_t rank = -1;
    const auto [end, ec] =
        std::from_chars(fields[1].data(), fields[1].data() + fields[1].size(), rank);
    if (ec != std::errc() || end != fields[1].data() + fields[1].size() || rank < 0 ||
        rank >= (int64_t(1) << 30))
      fail("{}:{}: invalid rank '{}'", path, line_no, fields[1]);
    if (static_cast<size_t>(rank) >= by_rank.size()) {
      by_rank.resize(rank + 1);
      line_of_rank.resize(rank + 1, 0);
    }
    if (line_of_rank[rank])
      fail("{}:{}: rank {} already given on line {}", path, line_no, rank, line_of_rank[rank]);
    const auto [it, inserted] = line_of_token.emplace(token, line_no);
    if (!inserted)
      fail("{}:{}: token '{}' already given on line {}", path, line_no, fields[0], it->second);
    line_of_rank[rank] = line_no;
    by_rank[rank] = token;
  }
  if (by_rank.empty()) fail("{}: empty tiktoken vocabulary", path);
  for (size_t r = 0; r < by_rank.size(); ++r)
    if (!line_of_rank[r])
      fail("{}: rank {} is missing (ranks go up to {}); is the file truncated?", path, r,
           by_rank.size() - 1);
  for (int b = 0; b < 256; ++b)
    if (!line_of_token.count(std::string(1, static_cast<char>(b))))
      fail("{}: no token for the single byte 0x{:02X}; byte-level BPE needs all 256", path, b);

  TiktokenVocab v;
  v.offsets.reserve(by_rank.size() + 1);
  v.offsets.push_back(0);
  for (const auto& t : by_rank) {
    v.arena += t;
    v.offsets.push_back(static_cast<uint32_t>(v.arena.size()));
  }
  return v;
}

void write_tiktoken_file(const std::string& path, const std::vector<std::string>& tokens) {
  std::ofstream out(path, std::ios::binary);
  if (!out) fail("{}: cannot open for writing", path);
  for (size_t r = 0; r < tokens.size(); ++r) out << base64_encode(tokens[r]) << ' ' << r << '\n';
  out.flush();
  if (!out) fail("{}: write failed", path);
}

}  // namespace llama3::text
