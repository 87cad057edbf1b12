// The default post-training data: generated tasks with verifiable answers and ranked
// responses. The pairs must not carry a shortcut a reward model could learn instead of the
// task - here, whether the better of two numbers is the smaller one, or whether the better of
// two words is the one in capitals.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "text/post/stages.h"

using namespace llama3::text::post;

namespace {
bool all_digits(const std::string& s) {
  return !s.empty() && s.find_first_not_of("0123456789") == std::string::npos;
}

bool all_capitals(const std::string& s) {
  return !s.empty() && s.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZ") == std::string::npos;
}

// Calls f(better, worse) for every ordered pair of responses the RM would see in the default
// data's training and held-out pairs (edited > chosen > rejected).
template <class F>
void for_each_default_pair(F f) {
  // One directory per test and process: ctest runs the tests of this file in parallel, and a
  // shared path let one test remove the other's tokenizer file mid-run.
  const std::string dir =
      (std::filesystem::temp_directory_path() /
       ("llama3_default_data_test_" +
        std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "_" +
        std::to_string(::getpid())))
          .string();
  std::filesystem::remove_all(dir);
  // A tokenizer file is only copied; the data itself does not need a real one.
  const std::string tok = dir + ".tok";
  std::ofstream(tok) << "stub";
  DefaultDataOptions o;
  o.out_dir = dir, o.n_train = 10, o.n_eval = 200, o.n_pref = 1200, o.n_prompts = 10, o.seed = 1;
  o.tokenizer = tok;
  make_default_data(o);
  for (const char* name : {"/prefs.jsonl", "/eval_prefs.jsonl"}) {
    std::ifstream in(dir + name);
    std::string line;
    while (std::getline(in, line)) {
      auto j = nlohmann::json::parse(line);
      const std::string c = j["chosen"], r = j["rejected"], e = j.value("edited", "");
      f(c, r);
      if (!e.empty()) f(e, c), f(e, r);
    }
  }
  std::filesystem::remove_all(dir);
  std::filesystem::remove(tok);
}
}  // namespace

TEST(DefaultData, ArithmeticPairsDoNotRewardTheSmallerNumber) {
  int64_t smaller_better = 0, larger_better = 0;
  for_each_default_pair([&](const std::string& better, const std::string& worse) {
    if (!all_digits(better) || !all_digits(worse)) return;
    (std::stoi(better) < std::stoi(worse) ? smaller_better : larger_better) += 1;
  });
  const int64_t n = smaller_better + larger_better;
  ASSERT_GT(n, 300);
  // A clear miss that was always larger (a * b, a + b + 10) made "smaller is better" right in
  // 629 of these 830 pairs (76%); now within a few points of half.
  EXPECT_NEAR(double(smaller_better) / double(n), 0.5, 0.06)
      << smaller_better << " smaller-better vs " << larger_better << " larger-better pairs";
}

TEST(DefaultData, WordPairsDoNotRewardCapitals) {
  // Pairs where exactly one response is all capitals: the uppercase task's answer beats its
  // lower-case misses, and the repeat task's answer beats its capitalised near and clear misses.
  int64_t capitals_better = 0, capitals_worse = 0;
  for_each_default_pair([&](const std::string& better, const std::string& worse) {
    if (all_capitals(better) == all_capitals(worse)) return;
    (all_capitals(better) ? capitals_better : capitals_worse) += 1;
  });
  const int64_t n = capitals_better + capitals_worse;
  ASSERT_GT(n, 300);
  // With lower-case clear misses only in the repeat task, capitals were the better response in
  // 64% of these pairs, and the RMs preferred SPRING to spring; now within a few points of half.
  EXPECT_NEAR(double(capitals_better) / double(n), 0.5, 0.06)
      << capitals_better << " capitals-better vs " << capitals_worse << " capitals-worse pairs";
}
