// `data tokenize` (tokenize_jsonl) with a byte-level test encoder: shard content and the
// errors for bad input. Independent of the real tokenizer.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "runtime/core/error.h"
#include "text/data/build.h"
#include "text/data/shard.h"

#include "scratch.h"

namespace fs = std::filesystem;
using namespace llama3::data;

namespace {

fs::path dir() { return llama3::testing::scratch_dir("tokenize"); }

std::string file(const std::string& name, const std::string& content) {
  return llama3::testing::write_scratch_file("tokenize", name, content);
}

// Bytes are ids; BOS = 256, EOS = 257; text containing "BOOM" fails to encode.
TextEncoder bytes_encoder() {
  TextEncoder e;
  e.encode_batch = [](std::span<const std::string> texts) {
    std::vector<std::vector<int32_t>> out;
    for (const auto& t : texts) {
      if (t.find("BOOM") != std::string::npos)
        llama3::fail("cannot encode at byte {}", t.find("BOOM"));
      out.emplace_back(reinterpret_cast<const uint8_t*>(t.data()),
                       reinterpret_cast<const uint8_t*>(t.data()) + t.size());
    }
    return out;
  };
  e.bos_id = 256;
  e.eos_id = 257;
  e.vocab_size = 300;
  return e;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const llama3::Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(Tokenize, WritesBosTokensEosPerDocument) {
  std::string in = file(
      "ok.jsonl", "{\"text\": \"hi\"}\n\n{\"text\": \"\", \"url\": \"u\"}\n{\"text\": \"abc\"}\n");
  std::string out = (dir() / "ok.shard").string();
  TokenizeStats st = tokenize_jsonl(bytes_encoder(), in, out);
  EXPECT_EQ(st.docs, 3);
  EXPECT_EQ(st.tokens, 4 + 2 + 5);
  Shard s = Shard::load(out);
  EXPECT_EQ(s.vocab_size(), 300u);
  ASSERT_EQ(s.n_docs(), 3);
  EXPECT_EQ(std::vector<int32_t>(s.doc(0).begin(), s.doc(0).end()),
            (std::vector<int32_t>{256, 'h', 'i', 257}));
  EXPECT_EQ(std::vector<int32_t>(s.doc(1).begin(), s.doc(1).end()),
            (std::vector<int32_t>{256, 257}));
}

TEST(Tokenize, BadInputNamesFileAndLine) {
  std::string out = (dir() / "bad.shard").string();
  auto run = [&](const std::string& name, const std::string& content) {
    return error_of([&] { tokenize_jsonl(bytes_encoder(), file(name, content), out); });
  };
  std::string e = run("json.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"\n");
  EXPECT_NE(e.find("json.jsonl:2: invalid JSONL line"), std::string::npos) << e;
  e = run("field.jsonl", "{\"text\": \"a\"}\n[1, 2]\n");
  EXPECT_NE(e.find("field.jsonl:2: expected an object with a string field \"text\""),
            std::string::npos)
      << e;
  e = run("utf8.jsonl", "{\"text\": \"a\"}\n{\"text\": \"caf\xe9\"}\n");
  EXPECT_NE(e.find("utf8.jsonl:2: invalid UTF-8 at byte offset 13"), std::string::npos) << e;
  e = run("encode.jsonl", "{\"text\": \"a\"}\n{\"text\": \"a BOOM\"}\n");
  EXPECT_NE(e.find("encode.jsonl:2: cannot encode at byte 2"), std::string::npos) << e;
  e = run("empty.jsonl", "\n  \n");
  EXPECT_NE(e.find("empty.jsonl: empty source"), std::string::npos) << e;
  e = error_of([&] { tokenize_jsonl(bytes_encoder(), (dir() / "missing.jsonl").string(), out); });
  EXPECT_NE(e.find("cannot open"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(out));  // nothing half-written under the shard's name
}

TEST(Manifest, SourcesMapOntoTheLoaderConfig) {
  std::string p = file("manifest.json",
                       R"({"sources": [{"name": "general", "shards": ["g.shard"], "weight": 0.5},
                                       {"name": "math", "shards": ["m1", "m2"], "weight": 0.25}]})");
  auto s = read_manifest_sources(p);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[1].name, "math");
  EXPECT_EQ(s[1].shards, (std::vector<std::string>{"m1", "m2"}));
  EXPECT_EQ(s[1].weight, 0.25);
  std::string e =
      error_of([&] { read_manifest_sources(file("bad.json", R"({"sources": [{"name": "x"}]})")); });
  EXPECT_NE(e.find("bad.json"), std::string::npos) << e;
  EXPECT_NE(e.find("shards"), std::string::npos) << e;
}
