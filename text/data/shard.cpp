#include "text/data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "runtime/core/error.h"

namespace llama3::data {
namespace {

constexpr std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr auto kCrcTable = make_crc_table();

template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  uint8_t b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.insert(out.end(), b, b + sizeof(T));
}

template <typename T>
T get(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

uint32_t crc32(std::span<const uint8_t> bytes, uint32_t crc) {
  crc = ~crc;
  for (uint8_t b : bytes) crc = kCrcTable[(crc ^ b) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

ShardWriter::ShardWriter(std::string path, uint32_t vocab_size)
    : path_(std::move(path)), vocab_size_(vocab_size) {
  LLAMA3_CHECK(vocab_size > 0, "shard {}: vocab_size must be positive", path_);
}

void ShardWriter::add(std::span<const int32_t> tokens) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || uint32_t(tokens[i]) >= vocab_size_)
      fail("shard {}: document {} token {} has id {} outside the vocabulary [0, {})", path_,
           n_docs(), i, tokens[i], vocab_size_);
  }
  tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
  offsets_.push_back(tokens_.size());
}

void ShardWriter::finish() {
  static_assert(std::endian::native == std::endian::little, "shards are little-endian");
  auto tok_bytes = std::as_bytes(std::span(tokens_));
  auto off_bytes = std::as_bytes(std::span(offsets_));
  auto u8 = [](std::span<const std::byte> b) {
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(b.data()), b.size());
  };
  uint32_t body_crc = crc32(u8(off_bytes), crc32(u8(tok_bytes)));
  std::vector<uint8_t> header;
  header.insert(header.end(), kShardMagic, kShardMagic + 8);
  put<uint32_t>(header, kShardVersion);
  put<uint32_t>(header, vocab_size_);
  put<uint64_t>(header, tokens_.size());
  put<uint64_t>(header, offsets_.size() - 1);
  put<uint32_t>(header, body_crc);
  put<uint32_t>(header, crc32(header));
  std::string tmp = path_ + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    LLAMA3_CHECK(f.good(), "shard {}: cannot open {} for writing", path_, tmp);
    f.write(reinterpret_cast<const char*>(header.data()), std::streamsize(header.size()));
    f.write(reinterpret_cast<const char*>(tok_bytes.data()), std::streamsize(tok_bytes.size()));
    f.write(reinterpret_cast<const char*>(off_bytes.data()), std::streamsize(off_bytes.size()));
    f.flush();
    LLAMA3_CHECK(f.good(), "shard {}: write failed (disk full?)", tmp);
  }
  std::filesystem::rename(tmp, path_);
}

Shard Shard::load(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail("shard {}: cannot open: {}", path, std::strerror(errno));
  struct stat sb {};
  if (::fstat(fd, &sb) != 0) {
    ::close(fd);
    fail("shard {}: cannot stat: {}", path, std::strerror(errno));
  }
  const size_t size = size_t(sb.st_size);
  if (size < kShardHeaderBytes) {
    ::close(fd);
    fail("shard {}: truncated header: file has {} bytes, the header needs {}", path, size,
         kShardHeaderBytes);
  }
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) fail("shard {}: mmap failed: {}", path, std::strerror(errno));
  Shard s;
  s.map_ = std::shared_ptr<const void>(
      m, [size](const void* p) { ::munmap(const_cast<void*>(p), size); });
  s.path_ = path;
  const uint8_t* p = static_cast<const uint8_t*>(m);
  if (std::memcmp(p, kShardMagic, 8) != 0)
    fail("shard {}: bad magic at offset 0 (not a llama3 token shard)", path);
  uint32_t version = get<uint32_t>(p + 8);
  if (version != kShardVersion)
    fail("shard {}: unsupported version {} at offset 8 (this build reads version {})", path,
         version, kShardVersion);
  if (crc32({p, 36}) != get<uint32_t>(p + 36))
    fail("shard {}: header checksum mismatch at offset 36", path);
  s.vocab_size_ = get<uint32_t>(p + 12);
  uint64_t n_tokens = get<uint64_t>(p + 16), n_docs = get<uint64_t>(p + 24);
  uint64_t tok_end = kShardHeaderBytes + n_tokens * 4;
  uint64_t expect = tok_end + (n_docs + 1) * 8;
  if (n_tokens > size || n_docs > size || size < expect)
    fail(
        "shard {}: truncated: header promises {} tokens and {} documents ({} bytes) but the file "
        "ends at offset {}",
        path, n_tokens, n_docs, expect, size);
  if (size > expect)
    fail("shard {}: {} unexpected trailing bytes after offset {}", path, size - expect, expect);
  if (crc32({p + kShardHeaderBytes, size - kShardHeaderBytes}) != get<uint32_t>(p + 32))
    fail("shard {}: data checksum mismatch (bytes {}..{}); the file is corrupt", path,
         kShardHeaderBytes, size);
  s.tokens_ = reinterpret_cast<const int32_t*>(p + kShardHeaderBytes);  // 4-aligned: page + 40
  s.n_tokens_ = n_tokens;
  s.offsets_.resize(n_docs + 1);
  std::memcpy(s.offsets_.data(), p + tok_end, (n_docs + 1) * 8);
  for (uint64_t i = 0; i <= n_docs; ++i) {
    uint64_t prev = i ? s.offsets_[i - 1] : 0;
    bool ok = (i == 0 ? s.offsets_[0] == 0 : s.offsets_[i] >= prev) &&
              (i < n_docs ? s.offsets_[i] <= n_tokens : s.offsets_[i] == n_tokens);
    if (!ok)
      fail("shard {}: document index entry {} = {} is invalid at offset {}", path, i, s.offsets_[i],
           tok_end + i * 8);
  }
  for (uint64_t i = 0; i < n_tokens; ++i) {
    if (uint32_t(s.tokens_[i]) >= s.vocab_size_)
      fail("shard {}: token id {} at offset {} is outside the vocabulary [0, {})", path,
           s.tokens_[i], kShardHeaderBytes + i * 4, s.vocab_size_);
  }
  return s;
}

}  // namespace llama3::data
