// Recipes: validation errors name file:line and field, --set paths, token schedules (batch
// ramp arithmetic, annealing to exactly zero) and checkpoint averaging.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <span>

#include "recipes/evals.h"
#include "recipes/recipe.h"
#include "recipes/runner.h"
#include "runtime/io/checkpoint.h"
#include "text/data/shard.h"
#include "text/tokenizer/tokenizer.h"
#include "text/train/trainer.h"
#include "test_util.h"

using namespace llama3;
using namespace llama3::recipes;
namespace fs = std::filesystem;

namespace {

// A valid two-stage recipe; line numbers below refer to this text.
const char* kRecipe = R"(name: "t"
stage { name: "data" kind: DATA }
stage {
  name: "pretrain"
  kind: PRETRAIN
  data_from: "data"
  model { flavour: "debug" }
  optimizer { lr: 1e-3 }
  batch { seq_len: 128 batch_tokens: 1024 micro_batch_tokens: 512
          ramp { at_tokens: 4096 batch_tokens: 2048 } }
  total_tokens: 8192
}
)";

using test_util::error_of;
using test_util::replace;

struct TmpDir {
  fs::path p;
  TmpDir() {
    p = fs::temp_directory_path() / ("recipes_test_" + std::to_string(::getpid()));
    fs::remove_all(p);
    fs::create_directories(p);
  }
  ~TmpDir() { fs::remove_all(p); }
};

}  // namespace

TEST(RecipeValidation, AValidRecipePasses) {
  auto r = LoadedRecipe::parse(kRecipe, "t.textproto");
  EXPECT_NO_THROW(r.validate(true));
}

TEST(RecipeValidation, UnknownFieldNamesFileLineAndField) {
  const std::string e = error_of([] {
    LoadedRecipe::parse(replace(kRecipe, "total_tokens: 8192", "total_tokenz: 8192"), "t.textproto");
  });
  EXPECT_NE(e.find("t.textproto:11:"), std::string::npos) << e;
  EXPECT_NE(e.find("total_tokenz"), std::string::npos) << e;
}

TEST(RecipeValidation, WrongTypeNamesFileLineAndColumn) {
  const std::string e = error_of([] {
    LoadedRecipe::parse(replace(kRecipe, "total_tokens: 8192", "total_tokens: \"lots\""), "t.textproto");
  });
  EXPECT_NE(e.find("t.textproto:11:17"), std::string::npos) << e;
}

TEST(RecipeValidation, InputFromALaterStageIsRejectedWithItsLine) {
  auto r = LoadedRecipe::parse(replace(replace(kRecipe, "data_from: \"data\"", "data_from: \"data\"\n  init_from: \"later\""),
                                       "total_tokens: 8192\n}", "total_tokens: 8192\n}\nstage { name: \"later\" kind: AVERAGE average { stages: \"pretrain\" } }"),
                               "t.textproto");
  const std::string e = error_of([&] { r.validate(true); });
  EXPECT_NE(e.find("t.textproto:7:3: stage 'pretrain' field init_from: 'later' is a later stage"), std::string::npos) << e;
}

TEST(RecipeValidation, UnknownInputIsRejected) {
  auto r = LoadedRecipe::parse(replace(kRecipe, "data_from: \"data\"", "data_from: \"dta\""), "t.textproto");
  const std::string e = error_of([&] { r.validate(true); });
  EXPECT_NE(e.find("t.textproto:6:3: stage 'pretrain' field data_from: no stage named 'dta'"), std::string::npos) << e;
}

TEST(RecipeValidation, BatchNotAMultipleOfSeqLenShowsTheArithmetic) {
  auto r = LoadedRecipe::parse(replace(kRecipe, "batch_tokens: 2048", "batch_tokens: 2000"), "t.textproto");
  const std::string e = error_of([&] { r.validate(true); });
  EXPECT_NE(e.find("t.textproto:10:34: stage 'pretrain' field batch.ramp[0].batch_tokens: batch of 2000 tokens is "
                   "not a multiple of seq_len 128"),
            std::string::npos)
      << e;
}

TEST(RecipeValidation, BatchNotDivisibleByDpTimesMicroBatch) {
  auto r = LoadedRecipe::parse(replace(kRecipe, "total_tokens: 8192", "total_tokens: 8192 parallel { dp_shard: 4 }"),
                               "t.textproto");
  const std::string e = error_of([&] { r.validate(false); });
  EXPECT_NE(e.find("batch of 1024 tokens is not divisible by dp 4 x micro-batch 512 tokens = 2048"), std::string::npos)
      << e;
  EXPECT_NE(e.find("t.textproto:9:"), std::string::npos) << e;
}

TEST(RecipeValidation, MultiRankLayoutsRunOnlyWithTheirWorldSize) {
  auto r = LoadedRecipe::parse(replace(kRecipe, "total_tokens: 8192", "total_tokens: 8192 parallel { tp: 2 }"),
                               "t.textproto");
  EXPECT_NO_THROW(r.validate(false));
  EXPECT_NO_THROW(r.validate(true, 2));
  const std::string e = error_of([&] { r.validate(true); });
  EXPECT_NE(e.find("needs 2 ranks; this run has 1"), std::string::npos) << e;
  const std::string e4 = error_of([&] { r.validate(true, 4); });
  EXPECT_NE(e4.find("needs 2 ranks; this run has 4"), std::string::npos) << e4;
}

TEST(RecipeValidation, ReservedKindsAreNotImplementedInThisBuild) {
  auto r = LoadedRecipe::parse(replace(kRecipe, "kind: PRETRAIN", "kind: VISION_ENCODER"), "t.textproto");
  const std::string e = error_of([&] { r.validate(true); });
  EXPECT_NE(e.find("t.textproto:5:3: stage 'pretrain' field kind: VISION_ENCODER is not implemented in this build"),
            std::string::npos)
      << e;
}

TEST(RecipeValidation, RampPointsMustIncreaseAndPrecedeTheEnd) {
  auto r = LoadedRecipe::parse(replace(kRecipe, "at_tokens: 4096", "at_tokens: 9000"), "t.textproto");
  const std::string e = error_of([&] { r.validate(true); });
  EXPECT_NE(e.find("batch.ramp[0].at_tokens: 9000 is not before total_tokens 8192"), std::string::npos) << e;
}

TEST(RecipeValidation, PassKeyWarmUpNeedsPassKeyDocumentsAndKeysHaveOneToSixDigits) {
  auto r = LoadedRecipe::parse(replace(kRecipe, "total_tokens: 8192", "total_tokens: 8192 synthetic_niah { only_tokens: 2048 }"),
                               "t.textproto");
  std::string e = error_of([&] { r.validate(true); });
  EXPECT_NE(e.find("field synthetic_niah.only_tokens: needs synthetic_niah.weight > 0 or micro_batches > 0"), std::string::npos) << e;
  r = LoadedRecipe::parse(replace(kRecipe, "total_tokens: 8192",
                                  "total_tokens: 8192 synthetic_niah { weight: 0.1 only_tokens: 2048 answer_only: true }"),
                          "t.textproto");
  EXPECT_NO_THROW(r.validate(true));
  r = LoadedRecipe::parse(replace(kRecipe, "total_tokens: 8192", "total_tokens: 8192 eval { niah { samples: 4 key_digits: 7 } }"),
                          "t.textproto");
  e = error_of([&] { r.validate(true); });
  EXPECT_NE(e.find("field eval.niah.key_digits: 7 must lie in [0, 6] (0: 1 digit)"), std::string::npos) << e;
  r = LoadedRecipe::parse(replace(kRecipe, "total_tokens: 8192", "total_tokens: 8192 eval { niah { samples: 4 candidates: 11 } }"),
                          "t.textproto");
  e = error_of([&] { r.validate(true); });
  EXPECT_NE(e.find("11 candidates need more than the 10 one-digit keys"), std::string::npos) << e;
}

TEST(RecipeOverrides, SetAddressesFieldsByPath) {
  auto r = LoadedRecipe::parse(kRecipe, "t.textproto");
  r.apply_override("pretrain.total_tokens=16384");
  r.apply_override("pretrain.optimizer.lr=2.5e-4");
  r.apply_override("pretrain.batch.ramp[0].at_tokens=2048");
  r.apply_override("pretrain.batch.ramp[1].at_tokens=6144");  // index == size appends
  r.apply_override("pretrain.batch.ramp[1].batch_tokens=4096");
  r.apply_override("pretrain.lr.decay=LINEAR");
  r.apply_override("seed=7");
  const Stage& s = r.recipe().stage(1);
  EXPECT_EQ(s.total_tokens(), 16384);
  EXPECT_EQ(s.optimizer().lr(), 2.5e-4);
  ASSERT_EQ(s.batch().ramp_size(), 2);
  EXPECT_EQ(s.batch().ramp(0).at_tokens(), 2048);
  EXPECT_EQ(s.batch().ramp(1).batch_tokens(), 4096);
  EXPECT_EQ(s.lr().decay(), LINEAR);
  EXPECT_EQ(r.recipe().seed(), 7u);
  EXPECT_NO_THROW(r.validate(true));
}

TEST(RecipeOverrides, BadPathsSayWhatIsValid) {
  auto r = LoadedRecipe::parse(kRecipe, "t.textproto");
  std::string e = error_of([&] { r.apply_override("pretrain.optimizer.lrr=1"); });
  EXPECT_NE(e.find("--set pretrain.optimizer.lrr: Optimizer has no field 'lrr' (fields: lr, beta1"), std::string::npos) << e;
  e = error_of([&] { r.apply_override("pretrian.total_tokens=1"); });
  EXPECT_NE(e.find("no stage 'pretrian' (stages: data, pretrain"), std::string::npos) << e;
  e = error_of([&] { r.apply_override("pretrain.total_tokens=many"); });
  EXPECT_NE(e.find("'many' is not a valid int64 for 'total_tokens'"), std::string::npos) << e;
  e = error_of([&] { r.apply_override("pretrain.kind=FINETUNE"); });
  EXPECT_NE(e.find("(one of: KIND_UNSPECIFIED DATA PRETRAIN"), std::string::npos) << e;
  e = error_of([&] { r.apply_override("pretrain.batch.ramp[3].at_tokens=1"); });
  EXPECT_NE(e.find("index 3 of 'ramp' is out of range (size 1; 1 appends)"), std::string::npos) << e;
  e = error_of([&] { r.apply_override("pretrain.total_tokens"); });
  EXPECT_NE(e.find("expected stage.field=value"), std::string::npos) << e;
}

TEST(RecipeOverrides, SetEditsAndAddsMapEntriesByKey) {
  auto r = LoadedRecipe::parse(replace(kRecipe, "total_tokens: 8192",
                                       "total_tokens: 8192\n  mix { at_tokens: 0 weights { key: \"general\" value: 0.5 }"
                                       " weights { key: \"math\" value: 0.5 } }"),
                               "t.textproto");
  r.apply_override("pretrain.mix[0].weights.math=0.3");  // an existing key
  r.apply_override("pretrain.mix[0].weights.code=0.2");  // a new key
  r.apply_override("pretrain.mix[1].at_tokens=4096");    // a new mix point ...
  r.apply_override("pretrain.mix[1].weights.general=1");  // ... with its first entry
  const Stage& s = r.recipe().stage(1);
  ASSERT_EQ(s.mix_size(), 2);
  const auto& w0 = s.mix(0).weights();
  EXPECT_EQ(w0.size(), 3u);
  EXPECT_EQ(w0.at("general"), 0.5);
  EXPECT_EQ(w0.at("math"), 0.3);
  EXPECT_EQ(w0.at("code"), 0.2);
  EXPECT_EQ(s.mix(1).at_tokens(), 4096);
  ASSERT_EQ(s.mix(1).weights().size(), 1u);
  EXPECT_EQ(s.mix(1).weights().at("general"), 1.0);
  // The edited map prints back (the resolved recipe.textproto of a run) with the new value.
  const std::string text = to_text(r.recipe());
  EXPECT_NE(text.find("key: \"code\"\n      value: 0.2"), std::string::npos) << text;
  EXPECT_NO_THROW(r.validate(true));
}

TEST(RecipeOverrides, BadMapPathsNameThePath) {
  auto r = LoadedRecipe::parse(replace(kRecipe, "total_tokens: 8192",
                                       "total_tokens: 8192\n  mix { weights { key: \"math\" value: 0.5 } }"),
                               "t.textproto");
  std::string e = error_of([&] { r.apply_override("pretrain.mix[0].weights.math=lots"); });
  EXPECT_NE(e.find("--set pretrain.mix[0].weights.math: 'lots' is not a valid double for 'weights.math'"),
            std::string::npos)
      << e;
  EXPECT_EQ(r.recipe().stage(1).mix(0).weights().at("math"), 0.5);  // left untouched
  e = error_of([&] { r.apply_override("pretrain.mix[0].weights=0.5"); });
  EXPECT_NE(e.find("--set pretrain.mix[0].weights: 'weights' is a map; address an entry by its key as weights.KEY"),
            std::string::npos)
      << e;
  e = error_of([&] { r.apply_override("pretrain.mix[0].weights[0]=0.5"); });
  EXPECT_NE(e.find("'weights' is a map; address an entry by its key"), std::string::npos) << e;
  e = error_of([&] { r.apply_override("pretrain.mix[0].weights.math.x=0.5"); });
  EXPECT_NE(e.find("--set pretrain.mix[0].weights.math.x: 'weights.math' is a double, it has no field 'x'"),
            std::string::npos)
      << e;
  EXPECT_EQ(r.recipe().stage(1).mix(0).weights().size(), 1u);
}

TEST(TokenSchedules, BatchRampArithmetic) {
  auto r = LoadedRecipe::parse(kRecipe, "t.textproto");
  r.apply_override("pretrain.batch.ramp[1].at_tokens=6144");
  r.apply_override("pretrain.batch.ramp[1].batch_tokens=4096");
  r.apply_override("pretrain.batch.ramp[1].seq_len=256");
  r.validate(true);
  const Stage& s = r.recipe().stage(1);
  BatchAt b = batch_at(s, 0);
  EXPECT_EQ(b.batch_tokens, 1024);
  EXPECT_EQ(b.seq_len, 128);
  EXPECT_EQ(b.micro_batch_size(), 4);  // 512 tokens / 128
  EXPECT_EQ(b.grad_accum(), 2);        // 1024 / 512
  b = batch_at(s, 4095);
  EXPECT_EQ(b.batch_tokens, 1024);
  b = batch_at(s, 4096);
  EXPECT_EQ(b.batch_tokens, 2048);
  EXPECT_EQ(b.grad_accum(), 4);
  b = batch_at(s, 6144);
  EXPECT_EQ(b.batch_tokens, 4096);
  EXPECT_EQ(b.seq_len, 256);
  EXPECT_EQ(b.micro_batch_size(), 2);
  EXPECT_EQ(b.grad_accum(), 8);
}

TEST(TokenSchedules, WarmupAndCosineAreInTokens) {
  Stage s;
  s.set_kind(PRETRAIN);
  s.set_total_tokens(10000);
  s.mutable_optimizer()->set_lr(1e-3);
  s.mutable_lr()->set_warmup_tokens(1000);
  s.mutable_lr()->set_min_lr(1e-4);
  EXPECT_FLOAT_EQ(token_lr(s, 500), 5e-4f);
  EXPECT_FLOAT_EQ(token_lr(s, 1000), 1e-3f);
  EXPECT_FLOAT_EQ(token_lr(s, 5500), 5.5e-4f);  // cosine midpoint
  EXPECT_FLOAT_EQ(token_lr(s, 10000), 1e-4f);
}

TEST(TokenSchedules, AnnealingLrReachesExactlyZero) {
  Stage s;
  s.set_kind(ANNEAL);
  s.set_total_tokens(40000);
  s.mutable_optimizer()->set_lr(8e-5);
  float prev = 1;
  for (int64_t t = 4000; t <= 40000; t += 4000) {
    const float lr = token_lr(s, t);
    EXPECT_LT(lr, prev) << t;
    prev = lr;
  }
  EXPECT_FLOAT_EQ(token_lr(s, 20000), 4e-5f);
  EXPECT_EQ(token_lr(s, 40000), 0.0f);  // exactly: the last update of the stage has LR 0
  EXPECT_EQ(token_lr(s, 40001), 0.0f);
}

TEST(Averaging, AverageIsTheElementwiseWeightedMean) {
  TmpDir tmp;
  text::LlamaConfig c = text::llama3_flavour("debug");
  text::LlamaModel a(c, 1), b(c, 2), m3(c, 3);
  const std::string da = (tmp.p / "a").string(), db = (tmp.p / "b").string(), dc = (tmp.p / "c").string();
  text::save_model(a, da);
  text::save_model(b, db);
  text::save_model(m3, dc);
  average_checkpoints({da, db, dc}, {1, 2, 1}, (tmp.p / "avg").string());
  average_checkpoints({da, db}, {}, (tmp.p / "uni").string());
  auto avg = text::load_model((tmp.p / "avg").string());
  auto uni = text::load_model((tmp.p / "uni").string());
  auto pa = a.named_parameters(), pb = b.named_parameters(), pc = m3.named_parameters();
  auto pv = avg->named_parameters(), pu = uni->named_parameters();
  ASSERT_EQ(pv.size(), pa.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    auto va = pa[i].tensor->to_vector<float>(), vb = pb[i].tensor->to_vector<float>();
    auto vc = pc[i].tensor->to_vector<float>();
    auto vv = pv[i].tensor->to_vector<float>(), vu = pu[i].tensor->to_vector<float>();
    for (size_t k = 0; k < va.size(); ++k) {
      // Accumulated in double, rounded once: exact against the same arithmetic.
      ASSERT_EQ(vv[k], float(0.0 + 0.25 * double(va[k]) + 0.5 * double(vb[k]) + 0.25 * double(vc[k])))
          << pa[i].name << "[" << k << "]";
      ASSERT_EQ(vu[k], float(0.0 + 0.5 * double(va[k]) + 0.5 * double(vb[k]))) << pa[i].name;
    }
  }
  EXPECT_NE(pv[0].tensor->to_vector<float>(), pa[0].tensor->to_vector<float>());
}

TEST(Averaging, MismatchedArchitecturesNameTheTensor) {
  TmpDir tmp;
  text::LlamaConfig c = text::llama3_flavour("debug");
  text::LlamaConfig wide = c;
  wide.dim = 128;
  text::LlamaModel a(c, 1), b(wide, 1);
  text::save_model(a, (tmp.p / "a").string());
  text::save_model(b, (tmp.p / "b").string());
  const std::string e = error_of(
      [&] { average_checkpoints({(tmp.p / "a").string(), (tmp.p / "b").string()}, {}, (tmp.p / "o").string()); });
  EXPECT_NE(e.find("average: tensor 'lm_head.weight' has shape [512, 128]"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(tmp.p / "o"));
}

// A 400-rank BPE trained on d/corpus.txt and the corpus written as a filler shard with it.
std::pair<text::Tokenizer, std::string> tokenizer_and_filler(const TmpDir& d) {
  text::BpeTrainOptions bo;
  bo.vocab_size = 400;
  std::vector<std::string> files = {(d.p / "corpus.txt").string()};
  text::train_bpe(files, bo, (d.p / "tok.model").string());
  auto tok = text::Tokenizer::load((d.p / "tok.model").string());
  const std::string shard = (d.p / "filler.shard").string();
  data::ShardWriter w(shard, uint32_t(tok.vocab_size()));
  std::ifstream in(d.p / "corpus.txt");
  std::string line;
  while (std::getline(in, line)) w.add(tok.encode(line + "\n"));
  w.finish();
  return {std::move(tok), shard};
}

TEST(Needles, DistractorsHaveTheKeysTokenShape) {
  // A BPE trained on numbers splits 4-digit keys unevenly ([80][6][4] vs [6][70][0]); were the
  // candidates' splits to differ, the model's prior over splits would pick among them.
  TmpDir d;
  {
    std::ofstream c(d.p / "corpus.txt");
    for (int i = 0; i < 400; ++i)
      c << "The pass key is " << (1000 + i * 37 % 9000) << ". Remember it. In " << (1900 + i % 120) << " there were "
        << (i * 13 % 1000) << " ships and " << (i % 97) << " ports; what is the pass key? The pass key is\n";
  }
  auto [tok, shard] = tokenizer_and_filler(d);
  Needles needles(tok, {shard}, /*key_digits=*/4);
  auto shape = [&](const std::vector<int32_t>& v) {
    std::vector<size_t> sh;
    for (int32_t t : v) sh.push_back(tok.decode(std::span<const int32_t>(&t, 1)).size());
    return sh;
  };
  std::set<std::vector<size_t>> shapes;
  for (uint64_t seed = 0; seed < 40; ++seed) {
    Needles::Prompt p = needles.prompt(96, 4, seed);
    ASSERT_EQ(p.candidates.size(), 4u);
    const auto& ans = p.candidates[size_t(p.answer)];
    EXPECT_EQ(int64_t(p.context.size() + ans.size()), 96);
    // The answer is the key written in the needle.
    const std::string key = tok.decode(ans);
    EXPECT_NE(tok.decode(p.context).find("The pass key is" + key + ". Remember it."), std::string::npos) << key;
    shapes.insert(shape(ans));
    std::set<std::string> texts;
    for (const auto& c : p.candidates) {
      EXPECT_EQ(shape(c), shape(ans)) << tok.decode(c) << " vs " << key;
      texts.insert(tok.decode(c));
    }
    EXPECT_EQ(texts.size(), 4u);  // distinct keys
  }
  EXPECT_GT(shapes.size(), 1u) << "the tokenizer should split keys in more than one way";
}

TEST(Needles, OneDigitKeysAreSingleTokensUniformAndOnlyInTheNeedle) {
  TmpDir d;
  {
    std::ofstream c(d.p / "corpus.txt");
    for (int i = 0; i < 400; ++i)
      c << "In " << (1900 + i % 120) << " there were " << (i * 13 % 1000) << " ships and " << (i % 97)
        << " ports on the coast; the pass was closed.\n";
  }
  auto [tok, shard] = tokenizer_and_filler(d);
  Needles needles(tok, {shard});  // one digit
  EXPECT_EQ(needles.answer_tokens(), 2);
  std::map<std::string, int> keys;
  std::vector<int> answer_at(4, 0);
  const std::string question = "What is the pass key? The pass key is";
  for (uint64_t seed = 0; seed < 400; ++seed) {
    Needles::Prompt p = needles.prompt(128, 4, seed);
    ASSERT_EQ(p.candidates.size(), 4u);
    EXPECT_EQ(int64_t(p.context.size() + p.candidates[0].size()), 128);
    const std::string key = tok.decode(p.candidates[size_t(p.answer)]);
    ++keys[key];
    ++answer_at[size_t(p.answer)];
    std::set<std::string> texts;
    for (const auto& c : p.candidates) {
      ASSERT_EQ(c.size(), 2u);  // the space, then the digit
      const std::string t = tok.decode(c);
      ASSERT_EQ(t.size(), 2u);
      EXPECT_EQ(t[0], ' ');
      EXPECT_TRUE(t[1] >= '0' && t[1] <= '9') << t;
      texts.insert(t);
    }
    EXPECT_EQ(texts.size(), 4u);  // distinct candidates
    // The needle is in the context once, before the question that ends it; the answer
    // appears nowhere else after "pass key is".
    const std::string ctx = tok.decode(p.context);
    const std::string needle = "The pass key is" + key + ". Remember it.";
    const size_t at = ctx.find(needle);
    ASSERT_NE(at, std::string::npos) << ctx;
    EXPECT_EQ(ctx.find(needle, at + 1), std::string::npos);
    EXPECT_EQ(ctx.size() - ctx.rfind(question), question.size());
    EXPECT_EQ(ctx.find("pass key is"), at + 4);
  }
  EXPECT_EQ(keys.size(), 10u);  // every digit is a key
  for (auto& [k, n] : keys) EXPECT_GT(n, 20) << k;
  for (int n : answer_at) EXPECT_GT(n, 70);  // the key's slot among the candidates is uniform

  // Training documents end with the answer and EOS: the last answer_tokens() + 1 tokens.
  const std::string docs = (d.p / "docs.shard").string();
  needles.write_training_shard(docs, 50, 96, 128, 3);
  data::Shard sh = data::Shard::load(docs);
  ASSERT_EQ(sh.n_docs(), 50);
  for (int64_t i = 0; i < sh.n_docs(); ++i) {
    auto doc = sh.doc(i);
    ASSERT_GE(doc.size(), 97u);
    ASSERT_LE(doc.size(), 129u);
    EXPECT_EQ(doc.back(), tok.eos_id());
    const std::vector<int32_t> ans(doc.end() - 3, doc.end() - 1);
    const std::string key = tok.decode(ans);
    const std::vector<int32_t> body(doc.begin(), doc.end() - 3);
    EXPECT_NE(tok.decode(body).find("The pass key is" + key + ". Remember it."), std::string::npos) << key;
  }
}
