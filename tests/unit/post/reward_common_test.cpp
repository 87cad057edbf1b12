// The reward model's held-out set common to every round (generated held-out pairs plus an
// earlier policy's held-out samples) and its pair-by-pair comparison with an earlier RM.
#include <cmath>
#include <fstream>
#include <map>

#include "fixture.h"

using namespace posttest;

namespace {
std::string prefs_jsonl(int n, int offset) {
  std::string s;
  for (int i = 0; i < n; ++i) {
    const int a = (i + offset) % 10, b = (i * 3 + offset) % 10;
    s += fmt::format(R"({{"prompt": "What is {} + {}?", "chosen": "{}", "rejected": "{}"}})"
                     "\n",
                     a, b, a + b, a + b + 1 + i % 3);
  }
  return s;
}
}  // namespace

TEST_F(PostTest, CommonHeldOutSetComparesRewardModelsPairByPair) {
  // An RM with a random score head (so it ranks some pairs right, some wrong) and one with a
  // zero head (every pair a tie: never strictly right).
  LlamaModel m(tiny_config(tok->vocab_size()), 7);
  const std::string rm_dir = (dir / "rm").string(), zero_dir = (dir / "zero").string();
  Tensor head = Tensor::zeros({1, m.config().dim}, DType::f32);
  {
    auto v = head.to_vector<float>();
    for (size_t i = 0; i < v.size(); ++i) v[i] = float((i * 37) % 11) / 5.f - 1.f;
    head = Tensor::from_vector(v, {1, m.config().dim});
  }
  save_policy(m, tok_path, rm_dir, {{"score.weight", head}});
  save_policy(m, tok_path, zero_dir,
              {{"score.weight", Tensor::zeros({1, m.config().dim}, DType::f32)}});
  const std::string gen = write("gen.jsonl", prefs_jsonl(12, 0)),
                    own = write("own.jsonl", prefs_jsonl(9, 4)),
                    earlier = write("earlier.jsonl", prefs_jsonl(7, 2));
  const ModelSource src{.dir = rm_dir, .tokenizer = tok_path};

  // Against itself: nothing fixed or broken, the same accuracy; the common set is the generated
  // pairs plus the earlier policy's, apart from the RM's own held-out samples.
  auto j = evaluate_reward_model(src, gen, {own}, {earlier}, rm_dir);
  EXPECT_EQ(j["eval_pairs"].get<int64_t>(), 21);
  EXPECT_EQ(j["eval_pairs_common"].get<int64_t>(), 19);
  EXPECT_EQ(j["common_fixed"].get<int64_t>(), 0);
  EXPECT_EQ(j["common_broken"].get<int64_t>(), 0);
  EXPECT_DOUBLE_EQ(j["compared_eval_accuracy_common"].get<double>(),
                   j["eval_accuracy_common"].get<double>());
  const double acc = j["eval_accuracy_common"].get<double>();
  EXPECT_GT(acc, 0.0);
  EXPECT_LT(acc, 1.0);
  // The common set equal to the RM's own held-out samples gives its eval_accuracy.
  auto same = evaluate_reward_model(src, gen, {own}, {own});
  EXPECT_DOUBLE_EQ(same["eval_accuracy_common"].get<double>(), same["eval_accuracy"].get<double>());
  EXPECT_FALSE(same.contains("common_fixed"));

  // Against the zero head (never right): every pair this RM gets right is fixed, none broken.
  auto z = evaluate_reward_model(src, gen, {}, {earlier}, zero_dir);
  EXPECT_DOUBLE_EQ(z["compared_eval_accuracy_common"].get<double>(), 0.0);
  EXPECT_EQ(z["common_fixed"].get<int64_t>(), int64_t(std::lround(acc * 19)));
  EXPECT_EQ(z["common_broken"].get<int64_t>(), 0);
  // And the other way round: all broken.
  auto r =
      evaluate_reward_model({.dir = zero_dir, .tokenizer = tok_path}, gen, {}, {earlier}, rm_dir);
  EXPECT_EQ(r["common_fixed"].get<int64_t>(), 0);
  EXPECT_EQ(r["common_broken"].get<int64_t>(), int64_t(std::lround(acc * 19)));
}

TEST_F(PostTest, EveryHeldOutPairIsWrittenWithItsScores) {
  LlamaModel m(tiny_config(tok->vocab_size()), 7);
  const std::string rm_dir = (dir / "rm").string(), zero_dir = (dir / "zero").string();
  std::vector<float> h(size_t(m.config().dim));
  for (size_t i = 0; i < h.size(); ++i) h[i] = float((i * 37) % 11) / 5.f - 1.f;
  save_policy(m, tok_path, rm_dir, {{"score.weight", Tensor::from_vector(h, {1, m.config().dim})}});
  save_policy(m, tok_path, zero_dir,
              {{"score.weight", Tensor::zeros({1, m.config().dim}, DType::f32)}});
  const std::string gen = write("gen.jsonl", prefs_jsonl(12, 0)),
                    own = write("own.jsonl", prefs_jsonl(9, 4)),
                    earlier = write("earlier.jsonl", prefs_jsonl(7, 2));
  const std::string rows_path = (dir / "pairs.jsonl").string();
  auto j = evaluate_reward_model({.dir = rm_dir, .tokenizer = tok_path}, gen, {own}, {earlier},
                                 zero_dir, rows_path);
  std::ifstream in(rows_path);
  std::map<std::string, int64_t> n, right;
  int64_t compared = 0, compared_right = 0;
  for (std::string line; std::getline(in, line);) {
    auto r = nlohmann::json::parse(line);
    const std::string set = r["set"];
    n[set] += 1, right[set] += r["correct"].get<bool>();
    // The flag is the scores' comparison, and the texts are the pair's.
    EXPECT_EQ(r["correct"].get<bool>(),
              r["better_score"].get<double>() > r["worse_score"].get<double>());
    EXPECT_EQ(r["prompt"].get<std::string>().rfind("What is ", 0), 0u) << line;
    EXPECT_NE(r["better"], r["worse"]);
    // Only the common set (generated + the earlier policy's samples) has the other RM's verdict.
    EXPECT_EQ(r.contains("compared_correct"), set != "on_policy") << line;
    if (r.contains("compared_correct"))
      compared += 1, compared_right += r["compared_correct"].get<bool>();
  }
  // The generated pairs once, though they belong to two sets.
  EXPECT_EQ(n["generated"], 12);
  EXPECT_EQ(n["on_policy"], 9);
  EXPECT_EQ(n["common_on_policy"], 7);
  EXPECT_EQ(right["generated"] + right["on_policy"],
            std::lround(j["eval_accuracy"].get<double>() * 21));
  EXPECT_EQ(right["generated"] + right["common_on_policy"],
            std::lround(j["eval_accuracy_common"].get<double>() * 19));
  EXPECT_EQ(right["generated"] + right["common_on_policy"], j["common_fixed"].get<int64_t>());
  EXPECT_EQ(compared, 19);
  EXPECT_EQ(compared_right, 0);  // the zero head ties every pair
}
