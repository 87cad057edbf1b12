// The tiktoken vocabulary file format: one `base64(token bytes) rank` per line, ranks
// 0..n-1 each exactly once. Shared by the tokenizer (reading) and the trainer (writing).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace llama3::text {

struct TiktokenVocab {
  std::string arena;              // token bytes in rank order
  std::vector<uint32_t> offsets;  // rank r = arena[offsets[r], offsets[r+1]); size n+1
};

// Reads and validates a tiktoken file. Throws llama3::Error naming the file and line for a
// malformed line (bad base64, missing or bad rank, extra fields, duplicate token or rank),
// and naming the file for a missing rank or a missing single-byte token (every byte must
// be encodable).
TiktokenVocab read_tiktoken_file(const std::string& path);

// Writes tokens (index = rank) in tiktoken format.
void write_tiktoken_file(const std::string& path, const std::vector<std::string>& tokens);

std::string base64_encode(std::string_view bytes);
// Returns false on characters outside the alphabet, a bad length or misplaced padding.
bool base64_decode(std::string_view text, std::string& out);

}  // namespace llama3::text
