// Sweep configs: shapes run at all budgets or at the ones they list, and bad fields are
// errors naming the file and field.
#include <gtest/gtest.h>

#include "runtime/core/error.h"
#include "text/scaling/sweep.h"

using namespace llama3::scaling;
using nlohmann::json;

TEST(SweepConfig, ShapesRunAtAllBudgetsOrTheirListedOnes) {
  const json j = json::parse(R"({"data": "d", "budgets": [3e10, 1e11],
    "models": [{"dim": 8, "n_heads": 2, "n_kv_heads": 1},
               {"dim": 16, "n_heads": 2, "n_kv_heads": 1, "budgets": [1e11]}]})");
  const SweepConfig c = SweepConfig::from_json(j, "cfg.json");
  ASSERT_EQ(c.models.size(), 2u);
  EXPECT_TRUE(c.models[0].runs_at(3e10));
  EXPECT_TRUE(c.models[0].runs_at(1e11));
  EXPECT_FALSE(c.models[1].runs_at(3e10));
  EXPECT_TRUE(c.models[1].runs_at(1e11));
  // The config round-trips (sweep.json stores it to decide whether to resume).
  EXPECT_EQ(SweepConfig::from_json(c.to_json(), "again").to_json(), c.to_json());
}

TEST(SweepConfig, ABudgetOutsideTheListIsAnError) {
  const json j = json::parse(R"({"data": "d", "budgets": [3e10],
    "models": [{"dim": 16, "n_heads": 2, "n_kv_heads": 1, "budgets": [1e12]}]})");
  try {
    SweepConfig::from_json(j, "cfg.json");
    FAIL() << "expected an error";
  } catch (const llama3::Error& e) {
    EXPECT_NE(std::string(e.what()).find("cfg.json: models[0].budgets lists 1e+12"),
              std::string::npos)
        << e.what();
  }
}

TEST(SweepConfig, UnknownFieldsAreErrors) {
  const json j =
      json::parse(R"({"data": "d", "budgets": [1e10], "models": [{"dim": 16}], "budget": 1})");
  EXPECT_THROW(SweepConfig::from_json(j, "cfg.json"), llama3::Error);
}
