// Token shards: the binary files `llama3 data tokenize` writes and the mixing loader reads.
// A shard holds many documents' token ids back to back plus an index of where each
// document starts, so the loader can pick documents without scanning. Every section is
// covered by a CRC32 so a damaged file is reported (file and byte offset), never trained on.
//
// Layout (little-endian):
//   offset 0   char[8]  magic "L3SHARD\0"
//          8   u32      version (1)
//         12   u32      vocab_size (every token id is < vocab_size)
//         16   u64      n_tokens
//         24   u64      n_docs
//         32   u32      crc32 of the token array followed by the offset index
//         36   u32      crc32 of bytes 0..35 (the header itself)
//         40   i32[n_tokens]   token ids
//          .   u64[n_docs+1]   document start offsets into the token array (last = n_tokens)
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace llama3::data {

inline constexpr char kShardMagic[8] = {'L', '3', 'S', 'H', 'A', 'R', 'D', '\0'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 40;

// CRC-32 (IEEE 802.3, reflected, as zlib's crc32). `crc` continues an earlier value.
uint32_t crc32(std::span<const uint8_t> bytes, uint32_t crc = 0);

// Accumulates documents and writes them as one shard. The file is written to PATH.tmp and
// renamed on finish(), so an interrupted writer never leaves a half shard under the name.
class ShardWriter {
 public:
  ShardWriter(std::string path, uint32_t vocab_size);
  // Appends one document (the caller includes BOS/EOS); ids must be < vocab_size.
  void add(std::span<const int32_t> tokens);
  void finish();
  int64_t n_docs() const { return int64_t(offsets_.size()) - 1; }
  int64_t n_tokens() const { return int64_t(tokens_.size()); }

 private:
  std::string path_;
  uint32_t vocab_size_;
  std::vector<int32_t> tokens_;
  std::vector<uint64_t> offsets_{0};
};

// A shard memory-mapped and fully validated (magic, version, checksums, monotone index, ids
// in range). Errors name the file and the byte offset of the bad field. The token array stays
// in the page cache rather than the heap, so shards larger than RAM can be mixed; copies share
// the mapping.
class Shard {
 public:
  static Shard load(const std::string& path);
  int64_t n_docs() const { return int64_t(offsets_.size()) - 1; }
  int64_t n_tokens() const { return int64_t(n_tokens_); }
  uint32_t vocab_size() const { return vocab_size_; }
  std::span<const int32_t> doc(int64_t i) const {
    return {tokens_ + offsets_[i], size_t(offsets_[i + 1] - offsets_[i])};
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  uint32_t vocab_size_ = 0;
  std::shared_ptr<const void> map_;  // the mapped file (unmapped with the last copy)
  const int32_t* tokens_ = nullptr;  // into the mapping
  size_t n_tokens_ = 0;
  std::vector<uint64_t> offsets_;  // copied: the index is small and may be unaligned
};

}  // namespace llama3::data
