// Specification of the tokenizer: exact round trips, special-token handling, UTF-8 errors,
// vocabulary-file errors, the Llama 3 special ids, Meta's run splitting, the trainer.
#include "text/tokenizer/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "runtime/core/error.h"
#include "text/tokenizer/pretokenize.h"
#include "text/tokenizer/tiktoken_file.h"

namespace llama3::text {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

fs::path temp_dir() {
  const fs::path d =
      fs::temp_directory_path() /
      ("llama3_tok_test_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
       "_" + std::to_string(static_cast<long>(getpid())));
  fs::create_directories(d);
  return d;
}

std::string write(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}

std::string read(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A small mixed-language corpus; the trainer turns it into a vocabulary with real merges.
std::string corpus_text() {
  std::string s;
  for (int i = 0; i < 200; ++i) {
    s += "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 12345 items!\n";
    s += "Der schnelle braune Fuchs springt über den faulen Hund. Привет, мир! こんにちは世界\n";
    s += "    int main() { return 0; }\r\n\t\tif (x == y) printf(\"%d\\n\", x);\n";
    s += "emoji 😀👍🏽🇫🇷 and more text " + std::to_string(i * 7919) + "\n";
  }
  return s;
}

std::string byte_vocab_file(const fs::path& dir) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.emplace_back(1, static_cast<char>(b));
  const auto path = (dir / "bytes.tiktoken").string();
  write_tiktoken_file(path, tokens);
  return path;
}

class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(temp_dir());
    const std::string corpus = write(*dir_ / "corpus.txt", corpus_text());
    vocab_ = new std::string((*dir_ / "trained.tiktoken").string());
    BpeTrainOptions opts;
    opts.vocab_size = 600;
    train_bpe(std::vector<std::string>{corpus}, opts, *vocab_);
    tok_ = new Tokenizer(Tokenizer::load(*vocab_));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete vocab_;
    fs::remove_all(*dir_);
    delete dir_;
  }
  static fs::path* dir_;
  static std::string* vocab_;
  static Tokenizer* tok_;
};
fs::path* TokenizerTest::dir_ = nullptr;
std::string* TokenizerTest::vocab_ = nullptr;
Tokenizer* TokenizerTest::tok_ = nullptr;

TEST_F(TokenizerTest, DecodeInvertsEncodeOnTrickyStrings) {
  const std::vector<std::string> cases = {
      "",
      "a",
      "Hello, world!",
      "It's I'M we'LL they'd 'ſ 'S",
      "tabs\tand\r\nCRLF\rCR\n\n\n  trailing   ",
      std::string("nul\0byte", 8),
      "😀👩‍👩‍👧‍👦🇫🇷👍🏽 emoji",
      "漢字かなカナ한국어 العربية हिन्दी ไทย",
      "combining e\u0301 a\u0308 \u200d\ufe0f",
      "unicode spaces \u00a0\u2000\u3000\u0085\u2028\x1c\x1f end",
      "<|eot_id|><|begin_of_text|> <|notreal|>",
      std::string(60'000, ' ') + "x",
      std::string(70'000, 'a'),
      std::string(30'001, '7'),
      corpus_text(),
  };
  for (const auto& s : cases) {
    const auto ids = tok_->encode(s);
    EXPECT_EQ(tok_->decode(ids), s) << "length " << s.size();
    for (int32_t id : ids) EXPECT_FALSE(tok_->is_special(id));
  }
}

TEST_F(TokenizerTest, TrainedMergesCompressText) {
  const std::string s = "The quick brown fox jumps over the lazy dog.";
  EXPECT_LT(tok_->encode(s).size(), s.size() / 2);
}

TEST_F(TokenizerTest, SpecialsAreTextUnlessAllowed) {
  const std::string s = "hi<|eot_id|>";
  const auto plain = tok_->encode(s);
  EXPECT_GT(plain.size(), 2u);
  for (int32_t id : plain) EXPECT_FALSE(tok_->is_special(id));

  EncodeOptions allow;
  allow.specials = SpecialTokens::kAllow;
  const auto ids = tok_->encode(s, allow);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.back(), tok_->special_id("<|eot_id|>"));
  EXPECT_EQ(ids.back(), tok_->n_base() + 9);
  EXPECT_EQ(tok_->decode(ids), s);

  // Unknown names and near misses stay text even when specials are allowed.
  for (const std::string t :
       {"<|notreal|>", "<|eot_id", "<<|eot_id|>>", "<|reserved_special_token_247|>"}) {
    const auto t_ids = tok_->encode(t, allow);
    EXPECT_EQ(tok_->decode(t_ids), t);
    int n_special = 0;
    for (int32_t id : t_ids) n_special += tok_->is_special(id);
    EXPECT_EQ(n_special, t == "<<|eot_id|>>" ? 1 : 0) << t;
  }
}

TEST_F(TokenizerTest, InvalidUtf8IsAnErrorNamingTheByteOffset) {
  const auto expect_offset = [&](const std::string& s, const std::string& where) {
    try {
      tok_->encode(s);
      ADD_FAILURE() << "no error for " << where;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("byte offset " + where));
    }
  };
  expect_offset("abc\xff", "3");
  expect_offset("ab\xc3", "2");                        // truncated 2-byte sequence
  expect_offset("\xe2\x82\xac ok \xed\xa0\x80", "7");  // surrogate after a valid euro sign
  expect_offset("x\xc0\xaf", "1");                     // overlong
  expect_offset("\xf4\x90\x80\x80", "0");              // above U+10FFFF
}

TEST_F(TokenizerTest, InvalidUtf8CanBeReplaced) {
  EncodeOptions opts;
  opts.invalid_utf8 = InvalidUtf8::kReplace;
  EXPECT_EQ(tok_->decode(tok_->encode("a\xff"
                                      "b\xe2\x82",
                                      opts)),
            "a\xEF\xBF\xBD"
            "b\xEF\xBF\xBD");
}

TEST_F(TokenizerTest, DecodeReturnsPartialUtf8AsRawBytes) {
  const Tokenizer bytes = Tokenizer::load(byte_vocab_file(*dir_));
  const auto ids = bytes.encode("\xc3\xa9");  // é as two byte tokens
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(bytes.decode(std::span(ids).first(1)), "\xc3");
}

TEST_F(TokenizerTest, DecodeRejectsIdsOutOfRange) {
  const std::vector<int32_t> bad = {tok_->vocab_size()};
  EXPECT_THROW(tok_->decode(bad), Error);
  const std::vector<int32_t> neg = {-1};
  EXPECT_THROW(tok_->decode(neg), Error);
}

TEST_F(TokenizerTest, BatchEqualsOneByOne) {
  // Byte slices may cut UTF-8 sequences; replacement keeps them encodable.
  EncodeOptions opts;
  opts.invalid_utf8 = InvalidUtf8::kReplace;
  std::vector<std::string> texts;
  for (int i = 0; i < 37; ++i) texts.push_back(corpus_text().substr(i * 101, 500 + i * 13));
  const auto batch = tok_->encode_batch(texts, opts);
  ASSERT_EQ(batch.size(), texts.size());
  for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ(batch[i], tok_->encode(texts[i], opts));

  // Errors inside the parallel loop reach the caller, naming the text.
  texts.push_back("bad \xff");
  try {
    tok_->encode_batch(texts);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("byte offset"));
  }
}

TEST_F(TokenizerTest, SmallVocabularyPutsSpecialsAfterItsRanks) {
  EXPECT_EQ(tok_->n_base(), 600);
  EXPECT_EQ(tok_->vocab_size(), 856);
  EXPECT_EQ(tok_->bos_id(), 600);
  EXPECT_EQ(tok_->special_id("<|end_of_text|>"), 601);
  EXPECT_THROW(tok_->special_id("<|nope|>"), Error);
}

TEST(TokenizerLlama3, SpecialNamesAndIdsFollowMeta) {
  // A synthetic vocabulary with Llama 3's 128,000 base ranks.
  const fs::path dir = temp_dir();
  std::string file;
  for (int r = 0; r < 128000; ++r) {
    std::string t(1, static_cast<char>(r));
    if (r >= 256) {
      t = "t";
      t += std::to_string(r);
    }
    file += base64_encode(t) + " " + std::to_string(r) + "\n";
  }
  const Tokenizer tok = Tokenizer::load(write(dir / "l3.tiktoken", file));
  fs::remove_all(dir);

  EXPECT_EQ(tok.n_base(), 128000);
  EXPECT_EQ(tok.vocab_size(), 128256);
  EXPECT_EQ(tok.bos_id(), 128000);
  EXPECT_EQ(tok.eos_id(), 128001);
  const std::vector<std::pair<std::string, int32_t>> expected = {
      {"<|begin_of_text|>", 128000},
      {"<|end_of_text|>", 128001},
      {"<|reserved_special_token_0|>", 128002},
      {"<|reserved_special_token_1|>", 128003},
      {"<|finetune_right_pad_id|>", 128004},
      {"<|step_id|>", 128005},
      {"<|start_header_id|>", 128006},
      {"<|end_header_id|>", 128007},
      {"<|eom_id|>", 128008},
      {"<|eot_id|>", 128009},
      {"<|python_tag|>", 128010},
      {"<|reserved_special_token_2|>", 128011},
      {"<|reserved_special_token_3|>", 128012},
      {"<|reserved_special_token_246|>", 128255},
  };
  for (const auto& [name, id] : expected) {
    EXPECT_EQ(tok.special_id(name), id) << name;
    const std::vector<int32_t> one = {id};
    EXPECT_EQ(tok.decode(one), name);
  }
  for (int32_t id = 128011; id < 128256; ++id) {
    const std::vector<int32_t> one = {id};
    EXPECT_EQ(tok.decode(one), "<|reserved_special_token_" + std::to_string(id - 128009) + "|>");
  }
  EncodeOptions allow;
  allow.specials = SpecialTokens::kAllow;
  EXPECT_THAT(tok.encode("<|start_header_id|>user<|end_header_id|>", allow),
              ElementsAre(128006, 'u', 's', 'e', 'r', 128007));
}

class VocabFileErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = temp_dir();
    for (int b = 0; b < 256; ++b)
      good_ += base64_encode(std::string(1, static_cast<char>(b))) + " " + std::to_string(b) + "\n";
  }
  void TearDown() override { fs::remove_all(dir_); }
  void expect_error(const std::string& contents, const std::string& message) {
    const std::string path = write(dir_ / "v.tiktoken", contents);
    try {
      Tokenizer::load(path);
      ADD_FAILURE() << "no error; expected " << message;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(message));
    }
  }
  fs::path dir_;
  std::string good_;
};

TEST_F(VocabFileErrors, NameTheFileAndLine) {
  const std::string p = (dir_ / "v.tiktoken").string();
  expect_error(good_ + "YWI= 256\n!!!= 257\n", p + ":258: invalid base64");
  expect_error(good_ + "YWI=\n", p + ":257: expected `base64(token) rank`, found 1 field");
  expect_error(good_ + "YWI= 256 extra\n", p + ":257: expected");
  expect_error(good_ + "YWI= x1\n", p + ":257: invalid rank 'x1'");
  expect_error(good_ + "YWI= 255\n", p + ":257: rank 255 already given on line 256");
  expect_error(good_ + "YQ== 256\n", p + ":257: token 'YQ==' already given on line 98");
  expect_error(good_ + "YWI= 256\nYW", p + ":258: expected");  // truncated last line
}

TEST_F(VocabFileErrors, NameTheFileForGapsAndMissingBytes) {
  const std::string p = (dir_ / "v.tiktoken").string();
  expect_error(good_ + "YWI= 257\n", p + ": rank 256 is missing");
  expect_error("", p + ": empty");
  expect_error("YQ== 0\n", p + ": no token for the single byte 0x00");
  expect_error(good_.substr(0, 40), p + ":");
  EXPECT_THROW(Tokenizer::load((dir_ / "absent").string()), Error);
}

TEST_F(VocabFileErrors, AcceptsBlankLinesAndCrlf) {
  std::string crlf;
  for (int b = 0; b < 256; ++b)
    crlf +=
        base64_encode(std::string(1, static_cast<char>(b))) + " " + std::to_string(b) + "\r\n\n";
  EXPECT_EQ(Tokenizer::load(write(dir_ / "crlf.tiktoken", crlf)).n_base(), 256);
}

TEST(Llama3Limits, SplitsRunsLikeMeta) {
  std::vector<std::string_view> out;
  const std::string s = "aaaa  b";
  split_llama3_limits(s, out, 1000, 3);
  EXPECT_THAT(out, ElementsAre("aaa", "a  b"));

  // Chunks first (4 characters), then runs inside each chunk.
  out.clear();
  split_llama3_limits(s, out, 4, 3);
  EXPECT_THAT(out, ElementsAre("aaa", "a", "  b"));

  // Characters, not bytes: "é" counts once.
  out.clear();
  const std::string e = "éééé";
  split_llama3_limits(e, out, 1000, 3);
  EXPECT_THAT(out, ElementsAre("ééé", "é"));

  // Python's isspace(): U+0085 and U+001C are whitespace, U+200B is not.
  out.clear();
  const std::string ws = "\u0085\x1c \u200b";
  split_llama3_limits(ws, out, 1000, 2);
  EXPECT_THAT(out, ElementsAre("\u0085\x1c", " \u200b"));
}

TEST(Llama3Limits, RealLimitsSplitLongRuns) {
  std::vector<std::string_view> out;
  const std::string spaces(60'000, ' ');
  split_llama3_limits(spaces, out);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0].size(), 25'000u);
  EXPECT_EQ(out[1].size(), 25'000u);
  EXPECT_EQ(out[2].size(), 10'000u);

  out.clear();
  std::string mixed;
  for (int i = 0; i < 300'000; ++i) mixed += i % 2 ? "a" : " ";  // no long runs
  mixed += std::string(200'000, 'b');
  split_llama3_limits(mixed, out);
  // Chunk 1: 400,000 chars = 300,000 alternating + 100,000 'b' -> cut at 25,000-runs.
  size_t total = 0;
  for (auto p : out) total += p.size();
  EXPECT_EQ(total, mixed.size());
  EXPECT_EQ(out[0].size(), 300'000u + 24'999u);  // the run starts at the 'a' before the b's
  EXPECT_EQ(out.back().size(), 100'000u - 75'000u);
}

TEST(Pretokenizer, MatchesTheLlama3Pattern) {
  Pretokenizer pre;
  std::vector<std::string_view> out;
  pre.split("Hello world's 12345 ,,!!\n\n  x  \n", out);
  EXPECT_THAT(
      out, ElementsAre("Hello", " world", "'s", " ", "123", "45", " ,,!!\n\n", " ", " x", "  \n"));
}

TEST(TrainBpe, IsDeterministicAndHasTheRequestedSize) {
  const fs::path dir = temp_dir();
  const std::string corpus = write(dir / "c.txt", corpus_text());
  BpeTrainOptions opts;
  opts.vocab_size = 500;
  const std::vector<std::string> files = {corpus};
  train_bpe(files, opts, (dir / "a.tiktoken").string());
  train_bpe(files, opts, (dir / "b.tiktoken").string());
  const std::string a = read(dir / "a.tiktoken");
  EXPECT_EQ(a, read(dir / "b.tiktoken"));
  const Tokenizer tok = Tokenizer::load((dir / "a.tiktoken").string());
  EXPECT_EQ(tok.n_base(), 500);
  for (int b = 0; b < 256; ++b) {
    const std::vector<int32_t> one = {b};
    EXPECT_EQ(tok.decode(one), std::string(1, static_cast<char>(b)));
  }
  // Too small a corpus for the size asked is an error, not a silently smaller vocabulary.
  opts.vocab_size = 100'000;
  EXPECT_THROW(train_bpe(files, opts, (dir / "big.tiktoken").string()), Error);
  // max_bytes reads only the start of the corpus.
  opts.vocab_size = 300;
  train_bpe(files, opts, (dir / "full.tiktoken").string());
  opts.max_bytes = 1000;
  train_bpe(files, opts, (dir / "capped.tiktoken").string());
  EXPECT_NE(read(dir / "capped.tiktoken"), read(dir / "full.tiktoken"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace llama3::text
