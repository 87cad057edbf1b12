// TEMPORARY STUB (branch `data`): a trivial implementation of the tokenizer contract
// (bytes are tokens 0..255, the 256 specials follow) so the data tools link before the
// real tokenizer branch is merged. DELETE THIS FILE AT MERGE; it is not the tokenizer.
#include <fstream>

#include "runtime/core/error.h"
#include "text/tokenizer/tokenizer.h"

namespace llama3::text {

struct Tokenizer::Impl {};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail("tokenizer {}: cannot open", path);
  return Tokenizer(std::make_unique<Impl>());
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, const EncodeOptions&) const {
  return std::vector<int32_t>(reinterpret_cast<const uint8_t*>(text.data()),
                              reinterpret_cast<const uint8_t*>(text.data()) + text.size());
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(std::span<const std::string> texts,
                                                          const EncodeOptions& opts) const {
  std::vector<std::vector<int32_t>> out;
  for (const auto& t : texts) out.push_back(encode(t, opts));
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string s;
  for (int32_t id : ids)
    if (id < 256) s.push_back(char(id));
  return s;
}

int32_t Tokenizer::n_base() const {
  return 256;
}
int32_t Tokenizer::vocab_size() const {
  return 512;
}
int32_t Tokenizer::special_id(std::string_view name) const {
  if (name == "<|begin_of_text|>") return 256;
  if (name == "<|end_of_text|>") return 257;
  if (name == "<|eot_id|>") return 265;
  fail("tokenizer stub: unknown special token '{}'", name);
}

void train_bpe(std::span<const std::string>, const BpeTrainOptions&, const std::string& out_path) {
  std::ofstream f(out_path);
  static const char* b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (int i = 0; i < 256; ++i) f << b64[i >> 2] << b64[(i & 3) << 4] << "== " << i << "\n";
}

}  // namespace llama3::text
