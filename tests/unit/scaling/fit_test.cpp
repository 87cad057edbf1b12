// Scaling-law fits recover known curves exactly: a parabola, a line, a power law, and a
// synthetic IsoFLOPs sweep whose optimal token counts follow D* = A C^alpha.
#include "text/scaling/fit.h"

#include <gtest/gtest.h>

#include <cmath>

#include "runtime/core/error.h"

using namespace llama3::scaling;

TEST(FitQuadratic, RecoversAParabolaExactly) {
  std::vector<double> x = {7.1, 7.4, 7.9, 8.3, 8.6}, y;
  for (double v : x) y.push_back(0.3 * v * v - 4.8 * v + 25.0);
  const Quadratic q = fit_quadratic(x, y);
  EXPECT_NEAR(q.a, 0.3, 1e-9);
  EXPECT_NEAR(q.b, -4.8, 1e-8);
  EXPECT_NEAR(q.c, 25.0, 1e-7);
  EXPECT_NEAR(q.argmin(), 8.0, 1e-9);
}

TEST(FitQuadratic, NeedsThreePoints) {
  EXPECT_THROW(fit_quadratic({1, 2}, {1, 2}), llama3::Error);
}

TEST(FitLinear, RecoversALineExactlyWithR2One) {
  const Linear l = fit_linear({1, 2, 3, 4}, {-0.5, -1.0, -1.5, -2.0});
  EXPECT_NEAR(l.slope, -0.5, 1e-12);
  EXPECT_NEAR(l.intercept, 0.0, 1e-12);
  EXPECT_NEAR(l.r2, 1.0, 1e-12);
}

TEST(FitPowerLaw, RecoversThePapersCoefficients) {
  // The paper's fit: N*(C) = 0.29 C^0.53.
  std::vector<double> c = {6e18, 1e19, 3e19, 1e20, 1e21, 1e22}, d;
  for (double v : c) d.push_back(0.29 * std::pow(v, 0.53));
  const PowerLaw p = fit_power_law(c, d);
  EXPECT_NEAR(p.alpha, 0.53, 1e-12);
  EXPECT_NEAR(p.A, 0.29, 1e-9);
  EXPECT_NEAR(p.r2, 1.0, 1e-12);
}

TEST(FitPowerLaw, RejectsNonPositiveValues) {
  EXPECT_THROW(fit_power_law({1, 2}, {1, 0}), llama3::Error);
}

TEST(FitScaling, SyntheticIsoflopsSweepGivesBackAAndAlpha) {
  // loss(C, D) = L(C) + k (log10 D - log10 D*(C))^2, D*(C) = 2.5 C^0.45, L(C) = 40 C^-0.1.
  const double A = 2.5, alpha = 0.45;
  std::vector<SweepRun> runs;
  for (double c : {1e12, 3e12, 1e13}) {
    const double xs = std::log10(A * std::pow(c, alpha));
    for (double dx : {-0.6, -0.25, 0.1, 0.5}) {
      SweepRun r;
      r.budget = c;
      r.tokens = std::pow(10.0, xs + dx);
      r.eval_loss = 40 * std::pow(c, -0.1) + 0.7 * dx * dx;
      r.math_loss = 30 * std::pow(c, -0.15) + 0.2 * dx * dx;
      runs.push_back(r);
    }
  }
  const ScalingFit f = fit_scaling(runs, 1e15);
  ASSERT_EQ(f.minima.size(), 3u);
  for (const auto& m : f.minima) {
    EXPECT_NEAR(std::log10(m.opt_tokens), std::log10(A * std::pow(m.budget, alpha)), 1e-9);
    EXPECT_NEAR(m.opt_loss, 40 * std::pow(m.budget, -0.1), 1e-9);
    EXPECT_TRUE(m.interior);
  }
  EXPECT_NEAR(f.tokens_vs_compute.alpha, alpha, 1e-9);
  EXPECT_NEAR(f.tokens_vs_compute.A, A, 1e-7);
  EXPECT_NEAR(f.loss_vs_compute.alpha, -0.1, 1e-9);
  EXPECT_NEAR(f.loss_vs_compute.A, 40, 1e-6);
  EXPECT_NEAR(f.pred_loss, 40 * std::pow(1e15, -0.1), 1e-8);
  EXPECT_NEAR(f.pred_tokens, A * std::pow(1e15, alpha), 1e-6 * f.pred_tokens);
  EXPECT_NEAR(f.pred_params_6n, 1e15 / (6 * f.pred_tokens), 1e-9 * f.pred_params_6n);
  ASSERT_TRUE(f.has_math);
  EXPECT_NEAR(f.pred_math_loss, 30 * std::pow(1e15, -0.15), 1e-8);
}

TEST(FitScaling, ANonConvexBudgetIsExcludedWithItsReason) {
  std::vector<SweepRun> runs;
  auto add = [&](double c, double x, double loss) {
    SweepRun r;
    r.budget = c, r.tokens = std::pow(10.0, x), r.eval_loss = loss;
    runs.push_back(r);
  };
  for (double x : {5.0, 6.0, 7.0}) add(1e11, x, -(x - 6) * (x - 6));     // concave: not bracketed
  for (double x : {5.0, 6.0, 7.0}) add(1e12, x, (x - 6) * (x - 6) + 3);  // minimum at 1e6 tokens
  for (double x : {5.5, 6.5, 7.5}) add(1e13, x, (x - 7) * (x - 7) + 2);  // minimum at 1e7 tokens
  const ScalingFit f = fit_scaling(runs, 0);
  ASSERT_EQ(f.excluded.size(), 1u);
  EXPECT_EQ(f.excluded[0].first, 1e11);
  EXPECT_NE(f.excluded[0].second.find("not convex"), std::string::npos) << f.excluded[0].second;
  ASSERT_EQ(f.minima.size(), 2u);
  EXPECT_NEAR(f.tokens_vs_compute.alpha, 1.0, 1e-9);  // one decade of tokens per decade of compute
}

TEST(FitScaling, FewerThanTwoUsableBudgetsIsAnErrorThatSaysWhy) {
  std::vector<SweepRun> runs;
  for (double c : {1e12, 1e13})
    for (double x : {5.0, 6.0, 7.0}) {
      SweepRun r;
      r.budget = c, r.tokens = std::pow(10.0, x), r.eval_loss = -(x - 6) * (x - 6);
      runs.push_back(r);
    }
  try {
    fit_scaling(runs, 0);
    FAIL() << "expected an error";
  } catch (const llama3::Error& e) {
    EXPECT_NE(std::string(e.what()).find("not convex"), std::string::npos) << e.what();
  }
}

TEST(FitScaling, NeedsTwoBudgets) {
  std::vector<SweepRun> runs(3);
  for (int i = 0; i < 3; ++i)
    runs[i].budget = 1e12, runs[i].tokens = 1e5 * (i + 1), runs[i].eval_loss = 3;
  EXPECT_THROW(fit_scaling(runs, 0), llama3::Error);
}
