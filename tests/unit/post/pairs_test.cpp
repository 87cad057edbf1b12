// Which preference pairs the post-training stages build: the verifier's on-policy pairs among
// one prompt's K samples (rejection sampling), the RM's ranking of its wrong samples, the pair
// DPO trains on, and the RM's balanced on-policy pairs.
#include <gtest/gtest.h>

#include <map>

#include "text/post/stages.h"

using namespace llama3::text::post;

namespace {
using Pairs = std::vector<std::pair<size_t, size_t>>;
}

TEST(VerifiedPairs, EveryDistinctWrongSampleAgainstACorrectOneHardestFirst) {
  //                                  0     1     2      3     4     5
  std::vector<std::string> resp = {"7", "6", "7", "6", "8", " "};
  std::vector<uint8_t> ok = {1, 0, 1, 0, 0, 0};
  std::vector<double> score = {0.1, 0.5, 0.9, 0.2, 0.7, 3.0};
  // Wrong and distinct: "6" (1, score 0.5; 3 repeats it) and "8" (4, score 0.7); the empty
  // sample 5 is no answer at all. Hardest (highest-scored) wrong first, each against the
  // correct samples in the RM's order (2, then 0).
  EXPECT_EQ(verified_pairs(resp, ok, score), (Pairs{{2, 4}, {0, 1}}));
}

TEST(VerifiedPairs, WithoutScoresKeepSampleOrder) {
  std::vector<std::string> resp = {"a", "b", "ok", "c"};
  std::vector<uint8_t> ok = {0, 0, 1, 0};
  EXPECT_EQ(verified_pairs(resp, ok, std::vector<double>(4, 0.0)), (Pairs{{2, 0}, {2, 1}, {2, 3}}));
}

TEST(VerifiedPairs, NoneWithoutACorrectOrAWrongSample) {
  EXPECT_TRUE(verified_pairs({"a", "b"}, {0, 0}, {0.0, 1.0}).empty());
  EXPECT_TRUE(verified_pairs({"a", "a"}, {1, 1}, {0.0, 1.0}).empty());
}

TEST(VerifiedPairs, MismatchedSizesThrow) {
  EXPECT_THROW(verified_pairs({"a", "b"}, {1}, {0.0, 1.0}), llama3::Error);
}

TEST(RankedWrongPairs, TheRmsBestAgainstEveryDistinctLowerScoredAnswer) {
  //                                  0     1     2     3     4      5
  std::vector<std::string> resp = {"8", "6", "9", "6", "10", " "};
  std::vector<uint8_t> ok(6, 0);
  std::vector<double> score = {0.7, 0.5, -1.0, 0.5, 0.7, 3.0};
  // The empty sample 5 is no answer, whatever it scores; "8" is the RM's best (the first of the
  // two at 0.7) against "9" (lowest first), "6" once, and "10", which only ties it, never.
  EXPECT_EQ(ranked_wrong_pairs(resp, ok, score), (Pairs{{0, 2}, {0, 1}}));
}

TEST(RankedWrongPairs, NoneWhereASampleVerifiesOrNothingScoresApart) {
  // A correct sample: the verifier's pairs decide this prompt.
  EXPECT_TRUE(ranked_wrong_pairs({"7", "6", "5"}, {1, 0, 0}, {0.0, 1.0, 2.0}).empty());
  EXPECT_TRUE(ranked_wrong_pairs({"6", "6"}, {0, 0}, {1.0, 1.0}).empty());  // one answer
  EXPECT_TRUE(ranked_wrong_pairs({"5", "6"}, {0, 0}, {1.0, 1.0}).empty());  // a tie
  EXPECT_TRUE(ranked_wrong_pairs({" ", ""}, {0, 0}, {1.0, 2.0}).empty());   // no answers
  EXPECT_EQ(ranked_wrong_pairs({"5", "6"}, {0, 0}, {1.0, 1.5}), (Pairs{{1, 0}}));
  EXPECT_THROW(ranked_wrong_pairs({"a", "b"}, {0}, {0.0, 1.0}), llama3::Error);
}

TEST(DpoPair, AnEditedResponseIsTheChosenOne) {
  Preference p{{}, "near miss", "clear miss", "edit"};
  Preference q = dpo_pair(p);
  EXPECT_EQ(q.chosen, "edit");
  EXPECT_EQ(q.rejected, "clear miss");
  EXPECT_TRUE(q.edited.empty());
  Preference plain{{}, "right", "wrong", ""};
  EXPECT_EQ(dpo_pair(plain).chosen, "right");
  EXPECT_EQ(dpo_pair(plain).rejected, "wrong");
}

// balance_response_pairs: no answer seen in both roles is kept more often in one role than it
// occurs in the other, pairs keep their order, and answers only ever in one role (a word task's
// answer, the policy's made-up fragments) are not limited.
TEST(BalancedPairs, EachAnswerAsOftenChosenAsRejected) {
  auto pref = [](std::string c, std::string r) {
    Preference p;
    p.chosen = std::move(c), p.rejected = std::move(r);
    return p;
  };
  // "14": chosen 3 times, rejected once -> kept once per role. "13": chosen once, rejected 3
  // times -> once per role. "9" is never rejected and "5" never chosen, but their pairs go with
  // "14" and "13" out of room; "river." vs "rivand." (each in one role only) stay, twice.
  const std::vector<Preference> in = {
      pref("14", "13"), pref("14", "13"), pref("13", "14"),
      pref("14", "5"),  pref("9", "13"),  pref("river.", "rivand."),
      pref("12", "11"), pref("11", "12"), pref("river.", "rivand.")};
  const auto out = balance_response_pairs(in);
  std::vector<std::pair<std::string, std::string>> got;
  for (const auto& p : out) got.emplace_back(p.chosen, p.rejected);
  const std::vector<std::pair<std::string, std::string>> want = {
      {"14", "13"}, {"13", "14"}, {"river.", "rivand."},
      {"12", "11"}, {"11", "12"}, {"river.", "rivand."}};
  EXPECT_EQ(got, want);
  // Every answer seen in both roles of `in` is kept as often in each.
  std::map<std::string, int> chosen, rejected;
  for (const auto& [c, r] : got) ++chosen[c], ++rejected[r];
  for (const char* a : {"14", "13", "12", "11"}) EXPECT_EQ(chosen[a], rejected[a]) << a;
  EXPECT_TRUE(balance_response_pairs({}).empty());
}
