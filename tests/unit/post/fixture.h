// Shared fixture of the post-training tests: a small BPE tokenizer trained on the fly and a
// tiny model sized to it, in a temporary directory.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "text/post/stages.h"

namespace posttest {

namespace fs = std::filesystem;
using namespace llama3;
using namespace llama3::text;
using namespace llama3::text::post;

inline LlamaConfig tiny_config(int64_t vocab) {
  LlamaConfig c;
  c.dim = 32, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2, c.vocab_size = vocab;
  c.multiple_of = 16, c.max_seq_len = 128;
  return c;
}

struct PostTest : ::testing::Test {
  fs::path dir;
  std::string tok_path;
  std::unique_ptr<Tokenizer> tok;
  void SetUp() override {
    dir = fs::temp_directory_path() /
          ("llama3_post_" + std::to_string(::getpid()) + "_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir);
    fs::create_directories(dir);
    {
      std::ofstream c(dir / "corpus.txt");
      for (int i = 0; i < 50; ++i)
        c << "What is " << i << " + " << (i * 7) % 10 << "? The answer is " << i + (i * 7) % 10
          << ". Write the word apple in uppercase: APPLE. hello world, system user assistant.\n";
    }
    tok_path = (dir / "tokenizer.model").string();
    BpeTrainOptions bo;
    bo.vocab_size = 300;
    std::vector<std::string> files = {(dir / "corpus.txt").string()};
    train_bpe(files, bo, tok_path);
    tok = std::make_unique<Tokenizer>(Tokenizer::load(tok_path));
  }
  void TearDown() override { fs::remove_all(dir); }
  std::string write(const std::string& name, const std::string& text) {
    std::ofstream((dir / name).string()) << text;
    return (dir / name).string();
  }
};

}  // namespace posttest
