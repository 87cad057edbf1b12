// `llama3 tokenizer train|encode|decode|stats`: the tokenizer from the command line.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "cli/commands.h"
#include "runtime/core/error.h"
#include "text/tokenizer/tokenizer.h"

namespace llama3::cli {
namespace {

constexpr const char* kUsage =
    "usage: llama3 tokenizer train --corpus FILE... --vocab-size N --out FILE [--max-bytes N]\n"
    "       llama3 tokenizer encode --vocab FILE [--allow-special] [--replace-invalid]"
    " (TEXT | --file F) [--out IDS.bin]\n"
    "       llama3 tokenizer decode --vocab FILE ID...\n"
    "       llama3 tokenizer stats --vocab FILE --file F";

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open {}", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Flags with one value, repeated values (--corpus a b c) and switches; the rest positional.
struct Parsed {
  std::string vocab, out, file;
  std::vector<std::string> corpus, positional;
  int64_t vocab_size = -1, max_bytes = 0;
  bool allow_special = false, replace_invalid = false;
};

int64_t parse_int(const std::string& flag, const std::string& v) {
  try {
    size_t used = 0;
    const long long x = std::stoll(v, &used);
    if (used == v.size()) return x;
  } catch (const std::exception&) {
  }
  fail("{} expects an integer, got '{}'", flag, v);
}

Parsed parse(const Args& args) {
  Parsed p;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    const auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) fail("{} needs a value\n{}", a, kUsage);
      return args[++i];
    };
    if (a == "--vocab") {
      p.vocab = value();
    } else if (a == "--out") {
      p.out = value();
    } else if (a == "--file") {
      p.file = value();
    } else if (a == "--vocab-size") {
      p.vocab_size = parse_int(a, value());
    } else if (a == "--max-bytes") {
      p.max_bytes = parse_int(a, value());
    } else if (a == "--allow-special") {
      p.allow_special = true;
    } else if (a == "--replace-invalid") {
      p.replace_invalid = true;
    } else if (a == "--corpus") {
      while (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) p.corpus.push_back(args[++i]);
      if (p.corpus.empty()) fail("--corpus needs at least one file\n{}", kUsage);
    } else if (a.rfind("--", 0) == 0 && a.size() > 2) {
      fail("unknown option {}\n{}", a, kUsage);
    } else {
      p.positional.push_back(a);
    }
  }
  return p;
}

text::Tokenizer load_vocab(const Parsed& p) {
  if (p.vocab.empty()) fail("--vocab FILE is required\n{}", kUsage);
  return text::Tokenizer::load(p.vocab);
}

int train(const Parsed& p) {
  if (p.corpus.empty() || p.out.empty() || p.vocab_size < 0)
    fail("train needs --corpus, --vocab-size and --out\n{}", kUsage);
  text::BpeTrainOptions opts;
  opts.vocab_size = static_cast<int32_t>(p.vocab_size);
  opts.max_bytes = static_cast<size_t>(p.max_bytes);
  const auto t0 = std::chrono::steady_clock::now();
  text::train_bpe(p.corpus, opts, p.out);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("wrote %s: %d base ranks (+256 specials) in %.2f s\n", p.out.c_str(), opts.vocab_size,
              s);
  return 0;
}

int encode(const Parsed& p) {
  const auto tok = load_vocab(p);
  std::string text;
  if (!p.file.empty()) {
    text = read_file(p.file);
  } else if (p.positional.size() == 1) {
    text = p.positional[0];
  } else {
    fail("encode needs one TEXT argument or --file F\n{}", kUsage);
  }
  text::EncodeOptions opts;
  opts.specials = p.allow_special ? text::SpecialTokens::kAllow : text::SpecialTokens::kDisallow;
  opts.invalid_utf8 = p.replace_invalid ? text::InvalidUtf8::kReplace : text::InvalidUtf8::kError;
  const auto ids = tok.encode(text, opts);
  if (!p.out.empty()) {  // raw little-endian int32, for tests and pipelines
    std::ofstream out(p.out, std::ios::binary);
    out.write(reinterpret_cast<const char*>(ids.data()),
              static_cast<std::streamsize>(ids.size() * sizeof(int32_t)));
    if (!out) fail("cannot write {}", p.out);
    return 0;
  }
  std::string line;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) line += ' ';
    line += std::to_string(ids[i]);
  }
  std::printf("%s\n", line.c_str());
  return 0;
}

int decode(const Parsed& p) {
  const auto tok = load_vocab(p);
  std::vector<int32_t> ids;
  for (const auto& a : p.positional) {
    // Accept "1 2 3" as separate arguments or one argument with spaces or commas.
    std::string s = a;
    for (char& c : s)
      if (c == ',') c = ' ';
    std::istringstream in(s);
    std::string t;
    while (in >> t) ids.push_back(static_cast<int32_t>(parse_int("decode", t)));
  }
  const std::string text = tok.decode(ids);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::printf("\n");
  return 0;
}

int stats(const Parsed& p) {
  const auto tok = load_vocab(p);
  if (p.file.empty()) fail("stats needs --file F\n{}", kUsage);
  const std::string text = read_file(p.file);
  size_t chars = 0;
  for (unsigned char c : text) chars += (c & 0xC0) != 0x80;
  text::EncodeOptions opts;
  opts.invalid_utf8 = text::InvalidUtf8::kReplace;
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = tok.encode(text, opts);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double n = ids.empty() ? 1.0 : double(ids.size());
  std::printf("vocab        %s (%d base + 256 special)\n", p.vocab.c_str(), tok.n_base());
  std::printf("bytes        %zu\n", text.size());
  std::printf("chars        %zu\n", chars);
  std::printf("tokens       %zu\n", ids.size());
  std::printf("bytes/token  %.3f\n", double(text.size()) / n);
  std::printf("chars/token  %.3f\n", double(chars) / n);
  std::printf("throughput   %.2f MB/s (%.0f tokens/s, one thread)\n", text.size() / s / 1e6,
              ids.size() / s);
  return 0;
}

}  // namespace

int cmd_tokenizer(const Args& args) {
  if (args.empty()) fail("missing subcommand\n{}", kUsage);
  const Parsed p = parse(args);
  const std::string& sub = args[0];
  if (sub == "train") return train(p);
  if (sub == "encode") return encode(p);
  if (sub == "decode") return decode(p);
  if (sub == "stats") return stats(p);
  fail("unknown subcommand '{}' (train, encode, decode, stats)\n{}", sub, kUsage);
}

}  // namespace llama3::cli
