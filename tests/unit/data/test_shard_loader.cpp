// Shards and the mixing loader, tested with token ids made directly (no tokenizer).
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "runtime/core/error.h"
#include "text/data/loader.h"
#include "text/data/shard.h"

#include "scratch.h"

namespace fs = std::filesystem;
using namespace llama3::data;

namespace {

fs::path tmpdir() { return llama3::testing::scratch_dir("data"); }

constexpr int32_t kBos = 4000, kEos = 4001;

// Source k's documents use ids in [k*1000, k*1000+999] (BOS/EOS aside), so a test can tell
// from a token which source it came from. Document d of source k has length 3 + (d*7+k)%L.
std::string make_shard(const std::string& name, int k, int n_docs, int max_len) {
  std::string path = (tmpdir() / (name + ".shard")).string();
  ShardWriter w(path, 4096);
  for (int d = 0; d < n_docs; ++d) {
    std::vector<int32_t> doc{kBos};
    int len = 1 + (d * 7 + k) % max_len;
    for (int i = 0; i < len; ++i) doc.push_back(k * 1000 + (d * 31 + i) % 1000);
    doc.push_back(kEos);
    w.add(doc);
  }
  w.finish();
  return path;
}

LoaderConfig four_sources(int prefetch = 2) {
  LoaderConfig c;
  c.sources = {{"general", {make_shard("g", 0, 300, 90)}, 0.50},
               {"math", {make_shard("m", 1, 200, 30)}, 0.25},
               {"code", {make_shard("c", 2, 100, 200)}, 0.17},
               {"multilingual", {make_shard("l", 3, 50, 60), make_shard("l2", 3, 20, 10)}, 0.08}};
  c.seq_len = 64;
  c.batch_size = 4;
  c.seed = 7;
  c.prefetch = prefetch;
  return c;
}

bool same(const Batch& a, const Batch& b) {
  return a.tokens == b.tokens && a.targets == b.targets && a.doc_ids == b.doc_ids;
}

std::string read_all(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}
void write_all(const std::string& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << s;
}

void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    FAIL() << "expected llama3::Error";
  } catch (const llama3::Error& e) {
    for (const auto& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Crc32, MatchesTheStandardCheckValue) {
  std::string s = "123456789";
  EXPECT_EQ(crc32({reinterpret_cast<const uint8_t*>(s.data()), s.size()}), 0xCBF43926u);
}

TEST(Shard, RoundTripsDocumentsExactly) {
  std::string path = (tmpdir() / "rt.shard").string();
  std::vector<std::vector<int32_t>> docs = {{1, 2, 3}, {}, {7}, {4095, 0, 5, 5}};
  ShardWriter w(path, 4096);
  for (auto& d : docs) w.add(d);
  w.finish();
  Shard s = Shard::load(path);
  ASSERT_EQ(s.n_docs(), 4);
  EXPECT_EQ(s.n_tokens(), 8);
  EXPECT_EQ(s.vocab_size(), 4096u);
  for (int i = 0; i < 4; ++i)
    EXPECT_EQ(std::vector<int32_t>(s.doc(i).begin(), s.doc(i).end()), docs[i]);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST(Shard, WriterRejectsIdsOutsideTheVocabulary) {
  ShardWriter w((tmpdir() / "bad.shard").string(), 10);
  std::vector<int32_t> doc{1, 10};
  expect_error([&] { w.add(doc); }, {"bad.shard", "id 10", "[0, 10)"});
}

TEST(Shard, TruncatedFileNamesFileAndOffset) {
  std::string path = make_shard("trunc", 0, 10, 20);
  std::string bytes = read_all(path);
  write_all(path, bytes.substr(0, bytes.size() - 5));
  expect_error([&] { Shard::load(path); },
               {"trunc.shard", "truncated", std::to_string(bytes.size() - 5)});
  write_all(path, bytes.substr(0, 20));
  expect_error([&] { Shard::load(path); }, {"trunc.shard", "truncated header", "20 bytes"});
}

TEST(Shard, CorruptBytesAreDetected) {
  std::string path = make_shard("corrupt", 0, 10, 20);
  std::string bytes = read_all(path);
  std::string b = bytes;
  b[100] ^= 0x40;
  write_all(path, b);
  expect_error([&] { Shard::load(path); }, {"corrupt.shard", "checksum"});
  b = bytes;
  b[0] = 'X';
  write_all(path, b);
  expect_error([&] { Shard::load(path); }, {"corrupt.shard", "magic", "offset 0"});
  b = bytes;
  b[13] ^= 1;  // vocab size: caught by the header checksum
  write_all(path, b);
  expect_error([&] { Shard::load(path); }, {"corrupt.shard", "header checksum", "offset 36"});
  expect_error([&] { Shard::load((tmpdir() / "missing.shard").string()); },
               {"missing.shard", "cannot open"});
}

TEST(MixingLoader, TargetsAreTheNextTokenAndDocIdsCountDocumentsPerRow) {
  LoaderConfig c = four_sources();
  MixingLoader L(c);
  for (int step = 0; step < 20; ++step) {
    Batch b = L.next();
    ASSERT_EQ(b.tokens.size(), size_t(c.batch_size * c.seq_len));
    for (int64_t r = 0; r < b.batch_size; ++r) {
      const int32_t* tok = &b.tokens[r * b.seq_len];
      const int32_t* tgt = &b.targets[r * b.seq_len];
      const int32_t* id = &b.doc_ids[r * b.seq_len];
      EXPECT_EQ(id[0], 0);
      for (int64_t i = 0; i + 1 < b.seq_len; ++i) {
        EXPECT_EQ(tgt[i], tok[i + 1]);
        // A new document starts exactly at a BOS that follows an EOS.
        EXPECT_EQ(id[i + 1], id[i] + (tok[i + 1] == kBos ? 1 : 0));
        if (tok[i + 1] == kBos) {
          EXPECT_EQ(tok[i], kEos);
        }
      }
    }
  }
}

TEST(MixingLoader, NoStraddleDocumentsStartARowWhenTheyDoNotFitAndTheGapIsPadding) {
  LoaderConfig c = four_sources();
  c.sources[1].no_straddle = true;  // "math": ids 1000..1999, documents of 3..32 tokens
  c.sources[2].no_straddle = true;  // "code": up to 202 tokens, longer than a 64-token row
  c.batch_size = 1;
  c.prefetch = 0;
  MixingLoader L(c);
  auto src = [](int32_t t) { return t == kBos || t == kEos ? -1 : t / 1000; };
  int padded_rows = 0, aligned_docs = 0;
  int32_t prev_last_target = -2;
  for (int step = 0; step < 400; ++step) {
    Batch b = L.next();
    const int64_t T = b.seq_len;
    const int32_t *tok = b.tokens.data(), *tgt = b.targets.data(), *id = b.doc_ids.data();
    if (prev_last_target >= 0) {
      EXPECT_EQ(tok[0], prev_last_target) << "row " << step;
    }
    int64_t pad = T;
    for (int64_t i = 0; i < T; ++i)
      if (tgt[i] == -1) {
        pad = i;
        break;
      }
    for (int64_t i = pad; i < T; ++i) {
      EXPECT_EQ(tgt[i], -1);
      EXPECT_EQ(id[i], id[pad]);
    }
    if (pad < T) {
      ++padded_rows;
      EXPECT_GT(pad, 0);
      EXPECT_EQ(tok[pad - 1], kEos);  // padding follows a whole document
      EXPECT_EQ(id[pad], id[pad - 1] + 1);
    }
    for (int64_t i = 0; i < pad; ++i) {
      if (i + 1 < pad) {
        EXPECT_EQ(tgt[i], tok[i + 1]);
      }
      if (tok[i] != kBos) continue;
      // Every aligned document either starts the row or ends (EOS) inside it.
      int64_t j = i + 1;
      while (j < pad && tok[j] != kEos) ++j;
      const int s = i + 1 < pad ? src(tok[i + 1]) : -1;
      if (s == 1 || s == 2) {
        ++aligned_docs;
        EXPECT_TRUE(i == 0 || j < pad) << "row " << step << ": an aligned document starts at " << i
                                       << " and runs past the row";
      }
    }
    prev_last_target = pad < T ? -2 : tgt[T - 1];
  }
  EXPECT_GT(padded_rows, 20);
  EXPECT_GT(aligned_docs, 100);
}

TEST(MixingLoader, NoStraddleStreamRestoresExactly) {
  LoaderConfig c = four_sources();
  for (auto& s : c.sources) s.no_straddle = true;
  MixingLoader a(c);
  for (int i = 0; i < 11; ++i) a.next();
  nlohmann::json st = nlohmann::json::parse(a.state().dump());
  MixingLoader b(c);
  b.restore(st);
  for (int i = 0; i < 30; ++i) EXPECT_TRUE(same(a.next(), b.next())) << "batch " << i;
}

TEST(MixingLoader, LossLastTokensLeavesLossOnlyOnEachDocumentsLastTokens) {
  LoaderConfig c = four_sources();
  c.sources[1].loss_last_tokens = 2;  // "math" (ids 1000..1999): its last token and EOS
  c.batch_size = 1;
  MixingLoader masked(c);
  c.sources[1].loss_last_tokens = 0;
  MixingLoader plain(c);
  int kept = 0, dropped = 0;
  for (int step = 0; step < 300; ++step) {
    Batch a = masked.next(), b = plain.next();
    ASSERT_EQ(a.tokens, b.tokens);
    ASSERT_EQ(a.doc_ids, b.doc_ids);
    for (int64_t i = 0; i < a.seq_len; ++i) {
      const int32_t t = b.targets[size_t(i)];
      const int32_t cur = a.tokens[size_t(i)];
      // In a math document, the target is its last content token or its EOS iff that
      // target is followed by EOS or is EOS itself; math content ids are 1000..1999.
      const bool math_doc = (cur >= 1000 && cur < 2000) || (cur == kBos && t >= 1000 && t < 2000);
      const bool math_eos = cur == kEos && i > 0 && a.tokens[size_t(i - 1)] / 1000 == 1 &&
                            a.tokens[size_t(i - 1)] < 2000;
      if (cur == kEos && i == 0) continue;  // its document began in the previous row
      if (math_eos) {  // a math document's EOS predicts the next document: no loss
        EXPECT_EQ(a.targets[size_t(i)], -1);
        continue;
      }
      if (!math_doc) {
        EXPECT_EQ(a.targets[size_t(i)], t);
        continue;
      }
      // Position i + 1 (or the next row) holds t; t is among the last two tokens when it is
      // EOS or the token after it is EOS.
      int32_t after = i + 2 < a.seq_len ? a.tokens[size_t(i + 2)] : (i + 1 < a.seq_len ? a.targets[size_t(i + 1)] : -2);
      if (after == -2) continue;  // the row's last target: its successor is in the next row
      const bool last_two = t == kEos || after == kEos;
      EXPECT_EQ(a.targets[size_t(i)], last_two ? t : -1) << "step " << step << " position " << i;
      (last_two ? kept : dropped)++;
    }
  }
  EXPECT_GT(kept, 50);
  EXPECT_GT(dropped, 200);
}

TEST(MixingLoader, ConsecutiveRowsContinueTheStream) {
  LoaderConfig c = four_sources();
  c.batch_size = 1;
  MixingLoader L(c);
  Batch prev = L.next();
  for (int step = 0; step < 30; ++step) {
    Batch b = L.next();
    EXPECT_EQ(prev.targets.back(), b.tokens.front());
    prev = b;
  }
}

TEST(MixingLoader, SameSeedSameBatchesOtherSeedDifferent) {
  LoaderConfig c = four_sources();
  MixingLoader a(c), b(c);
  c.seed = 8;
  MixingLoader d(c);
  bool any_diff = false;
  for (int i = 0; i < 25; ++i) {
    Batch x = a.next(), y = b.next(), z = d.next();
    EXPECT_TRUE(same(x, y)) << "batch " << i;
    any_diff |= !same(x, z);
  }
  EXPECT_TRUE(any_diff);
}

TEST(MixingLoader, PrefetchDoesNotChangeTheStream) {
  MixingLoader a(four_sources(0)), b(four_sources(3));
  for (int i = 0; i < 25; ++i) EXPECT_TRUE(same(a.next(), b.next())) << "batch " << i;
}

TEST(MixingLoader, RestoredLoaderContinuesExactly) {
  LoaderConfig c = four_sources();
  MixingLoader a(c);
  for (int i = 0; i < 13; ++i) a.next();
  // Round-trip through text, as a checkpoint does.
  nlohmann::json st = nlohmann::json::parse(a.state().dump());
  MixingLoader b(c);
  b.next();  // a loader that already moved must also jump to the saved position
  b.restore(st);
  for (int i = 0; i < 40; ++i) EXPECT_TRUE(same(a.next(), b.next())) << "batch " << i;
}

TEST(MixingLoader, RestoreRejectsAStateFromOtherData) {
  LoaderConfig c = four_sources();
  MixingLoader a(c);
  nlohmann::json st = a.state();
  c.seq_len = 32;
  MixingLoader b(c);
  expect_error([&] { b.restore(st); }, {"seq_len 64", "32"});
  nlohmann::json bad = st;
  bad["sources"][1]["n_docs"] = 5;
  MixingLoader d(four_sources());
  expect_error([&] { d.restore(bad); }, {"math", "5 documents"});
  expect_error([&] { d.restore(nlohmann::json::object()); }, {"malformed state"});
}

TEST(MixingLoader, TokenShareOfEachSourceFollowsTheWeights) {
  LoaderConfig c = four_sources();
  c.batch_size = 16;
  c.seq_len = 256;
  MixingLoader L(c);
  std::map<int, double> count;
  double total = 0;
  for (int i = 0; i < 150; ++i) {
    Batch b = L.next();
    for (int32_t t : b.tokens) {
      if (t >= 4000) continue;
      count[t / 1000] += 1;
      total += 1;
    }
  }
  // ~600k tokens: sampling noise on a share is well under 0.01.
  EXPECT_NEAR(count[0] / total, 0.50, 0.02);
  EXPECT_NEAR(count[1] / total, 0.25, 0.02);
  EXPECT_NEAR(count[2] / total, 0.17, 0.02);
  EXPECT_NEAR(count[3] / total, 0.08, 0.02);
}

TEST(MixingLoader, SetWeightsChangesTheMixFromTheNextBatch) {
  LoaderConfig c = four_sources(4);
  MixingLoader L(c);
  for (int i = 0; i < 5; ++i) L.next();  // the worker has batches queued under the old mix
  L.set_weights({0, 1, 0, 0});
  for (int i = 0; i < 10; ++i) {
    Batch b = L.next();
    for (int64_t k = (i == 0 ? b.seq_len : 0); k < int64_t(b.tokens.size()); ++k) {
      // The first row may finish a document started before the change.
      if (b.tokens[k] < 4000) {
        EXPECT_EQ(b.tokens[k] / 1000, 1) << "batch " << i << " pos " << k;
      }
    }
  }
  expect_error([&] { L.set_weights({0, 0, 0, 0}); }, {"all 4 source weights are zero"});
  expect_error([&] { L.set_weights({1, 1}); }, {"2 weights", "4 sources"});
}

TEST(MixingLoader, DataParallelRanksPartitionTheSingleRankBatch) {
  for (int dp : {2, 3}) {
    LoaderConfig c = four_sources();
    c.batch_size = 2 * dp;
    MixingLoader single(c);
    std::vector<std::unique_ptr<MixingLoader>> ranks;
    for (int r = 0; r < dp; ++r) {
      LoaderConfig rc = c;
      rc.batch_size = 2;
      rc.dp_size = dp;
      rc.dp_rank = r;
      ranks.push_back(std::make_unique<MixingLoader>(rc));
    }
    for (int step = 0; step < 10; ++step) {
      Batch g = single.next();
      const int64_t T = c.seq_len;
      for (int r = 0; r < dp; ++r) {
        Batch b = ranks[r]->next();
        for (int j = 0; j < 2; ++j) {
          // Local row j of rank r is global row j*dp + r.
          int64_t gr = j * dp + r;
          auto row = [&](const std::vector<int32_t>& v, int64_t i) {
            return std::vector<int32_t>(v.begin() + i * T, v.begin() + (i + 1) * T);
          };
          EXPECT_EQ(row(b.tokens, j), row(g.tokens, gr));
          EXPECT_EQ(row(b.targets, j), row(g.targets, gr));
          EXPECT_EQ(row(b.doc_ids, j), row(g.doc_ids, gr));
        }
      }
    }
    // All ranks hold the same global position, so any rank's state restores anywhere.
    EXPECT_EQ(ranks[0]->state(), single.state());
  }
}

TEST(MixingLoader, EmptySourceIsAClearError) {
  std::string path = (tmpdir() / "empty.shard").string();
  ShardWriter w(path, 4096);
  w.finish();
  LoaderConfig c;
  c.sources = {{"general", {path}, 1.0}};
  expect_error([&] { MixingLoader L(c); }, {"general", "empty", "empty.shard"});
}

TEST(MixingLoader, StateRestoresUnderADifferentDataParallelLayout) {
  LoaderConfig c = four_sources();
  c.batch_size = 4;
  MixingLoader single(c);
  for (int i = 0; i < 7; ++i) single.next();
  nlohmann::json st = single.state();
  Batch want = single.next();
  LoaderConfig rc = c;
  rc.batch_size = 2;
  rc.dp_size = 2;
  rc.dp_rank = 1;
  MixingLoader rank1(rc);
  rank1.restore(st);
  Batch got = rank1.next();
  const int64_t T = c.seq_len;
  for (int j = 0; j < 2; ++j)
    EXPECT_TRUE(std::equal(got.tokens.begin() + j * T, got.tokens.begin() + (j + 1) * T,
                           want.tokens.begin() + (j * 2 + 1) * T));
}

TEST(MixingLoader, PacksLongSequencesQuickly) {
  LoaderConfig c = four_sources(0);
  c.seq_len = 8192;
  c.batch_size = 8;
  MixingLoader L(c);
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; ++i) L.next();
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // 1.3M tokens; copying runs should take milliseconds. Generous bound for loaded CI machines.
  EXPECT_LT(s, 2.0) << "packing 20 batches of 8x8192 took " << s << " s";
}
