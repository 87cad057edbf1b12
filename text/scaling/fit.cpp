#include "text/scaling/fit.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <map>

#include "runtime/core/error.h"

namespace llama3::scaling {

namespace {
// Solves the 3x3 system m x = r by Gaussian elimination with partial pivoting.
std::array<double, 3> solve3(std::array<std::array<double, 3>, 3> m, std::array<double, 3> r) {
  for (int col = 0; col < 3; ++col) {
    int p = col;
    for (int i = col + 1; i < 3; ++i)
      if (std::abs(m[i][col]) > std::abs(m[p][col])) p = i;
    std::swap(m[col], m[p]);
    std::swap(r[col], r[p]);
    LLAMA3_CHECK(std::abs(m[col][col]) > 1e-300,
                 "quadratic fit: singular system (x values not distinct?)");
    for (int i = col + 1; i < 3; ++i) {
      const double f = m[i][col] / m[col][col];
      for (int k = col; k < 3; ++k) m[i][k] -= f * m[col][k];
      r[i] -= f * r[col];
    }
  }
  std::array<double, 3> x{};
  for (int i = 2; i >= 0; --i) {
    double s = r[i];
    for (int k = i + 1; k < 3; ++k) s -= m[i][k] * x[k];
    x[i] = s / m[i][i];
  }
  return x;
}

double r_squared(const std::vector<double>& x, const std::vector<double>& y, const Linear& l) {
  double mean = 0;
  for (double v : y) mean += v;
  mean /= double(y.size());
  double ss_res = 0, ss_tot = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    ss_res += (y[i] - l(x[i])) * (y[i] - l(x[i]));
    ss_tot += (y[i] - mean) * (y[i] - mean);
  }
  return ss_tot > 0 ? 1.0 - ss_res / ss_tot : 1.0;
}
}  // namespace

Quadratic fit_quadratic(const std::vector<double>& x, const std::vector<double>& y) {
  LLAMA3_CHECK(x.size() == y.size(), "quadratic fit: {} x values but {} y values", x.size(),
               y.size());
  LLAMA3_CHECK(x.size() >= 3, "quadratic fit needs at least 3 points, got {}", x.size());
  // Centre x for conditioning, then expand back.
  double mx = 0;
  for (double v : x) mx += v;
  mx /= double(x.size());
  std::array<std::array<double, 3>, 3> m{};
  std::array<double, 3> r{};
  for (size_t i = 0; i < x.size(); ++i) {
    const double u = x[i] - mx;
    const double p[3] = {u * u, u, 1.0};
    for (int a = 0; a < 3; ++a) {
      for (int b = 0; b < 3; ++b) m[a][b] += p[a] * p[b];
      r[a] += p[a] * y[i];
    }
  }
  const auto s = solve3(m, r);  // y = s0 u^2 + s1 u + s2, u = x - mx
  return {s[0], s[1] - 2 * s[0] * mx, s[0] * mx * mx - s[1] * mx + s[2]};
}

Linear fit_linear(const std::vector<double>& x, const std::vector<double>& y) {
  LLAMA3_CHECK(x.size() == y.size(), "linear fit: {} x values but {} y values", x.size(), y.size());
  LLAMA3_CHECK(x.size() >= 2, "linear fit needs at least 2 points, got {}", x.size());
  double mx = 0, my = 0;
  for (size_t i = 0; i < x.size(); ++i) mx += x[i], my += y[i];
  mx /= double(x.size()), my /= double(y.size());
  double sxx = 0, sxy = 0;
  for (size_t i = 0; i < x.size(); ++i)
    sxx += (x[i] - mx) * (x[i] - mx), sxy += (x[i] - mx) * (y[i] - my);
  LLAMA3_CHECK(sxx > 0, "linear fit: all {} x values are equal ({})", x.size(), x[0]);
  Linear l;
  l.slope = sxy / sxx;
  l.intercept = my - l.slope * mx;
  l.r2 = r_squared(x, y, l);
  return l;
}

double PowerLaw::operator()(double x) const {
  return A * std::pow(x, alpha);
}

PowerLaw fit_power_law(const std::vector<double>& x, const std::vector<double>& y) {
  LLAMA3_CHECK(x.size() == y.size(), "power-law fit: {} x values but {} y values", x.size(),
               y.size());
  std::vector<double> lx, ly;
  for (size_t i = 0; i < x.size(); ++i) {
    LLAMA3_CHECK(x[i] > 0 && y[i] > 0, "power-law fit: point {} is ({}, {}); both must be positive",
                 i, x[i], y[i]);
    lx.push_back(std::log10(x[i]));
    ly.push_back(std::log10(y[i]));
  }
  const Linear l = fit_linear(lx, ly);
  return {std::pow(10.0, l.intercept), l.slope, l.r2};
}

nlohmann::json to_json(const SweepRun& r) {
  nlohmann::json j = {{"budget", r.budget},
                      {"flops", r.flops},
                      {"tokens", r.tokens},
                      {"params", r.params},
                      {"flops_per_token", r.flops_per_token},
                      {"dim", r.dim},
                      {"n_layers", r.n_layers},
                      {"eval_loss", r.eval_loss},
                      {"seconds", r.seconds}};
  if (std::isfinite(r.math_loss)) j["math_loss"] = r.math_loss;
  return j;
}

SweepRun sweep_run_from_json(const nlohmann::json& j, const std::string& where) {
  SweepRun r;
  auto num = [&](const char* k) -> double {
    LLAMA3_CHECK(j.contains(k) && j[k].is_number(), "{}: missing numeric field '{}'", where, k);
    return j[k].get<double>();
  };
  r.budget = num("budget");
  r.tokens = num("tokens");
  r.eval_loss = num("eval_loss");
  r.flops = j.value("flops", r.budget);
  r.params = j.value("params", 0.0);
  r.flops_per_token = j.value("flops_per_token", 0.0);
  r.dim = j.value("dim", int64_t(0));
  r.n_layers = j.value("n_layers", int64_t(0));
  r.math_loss = j.contains("math_loss") ? j["math_loss"].get<double>() : NAN;
  r.seconds = j.value("seconds", 0.0);
  return r;
}

ScalingFit fit_scaling(const std::vector<SweepRun>& runs, double target_budget) {
  std::map<double, std::vector<SweepRun>> by_budget;
  for (const auto& r : runs) by_budget[r.budget].push_back(r);
  ScalingFit f;
  f.target_budget = target_budget;
  f.has_math = std::all_of(runs.begin(), runs.end(),
                           [](const SweepRun& r) { return std::isfinite(r.math_loss); });
  std::vector<double> cs, ds, ls, ms;
  for (auto& [c, rs] : by_budget) {
    if (rs.size() < 3) {
      f.excluded.emplace_back(
          c, fmt::format("{} runs; the IsoFLOPs parabola needs at least 3", rs.size()));
      continue;
    }
    std::vector<double> x, y, m;
    for (const auto& r : rs) {
      x.push_back(std::log10(r.tokens));
      y.push_back(r.eval_loss);
      m.push_back(r.math_loss);
    }
    IsoflopsMin mn;
    mn.budget = c;
    mn.curve = fit_quadratic(x, y);
    if (!(mn.curve.a > 0)) {
      f.excluded.emplace_back(
          c, fmt::format("loss vs log10(tokens) is not convex (x^2 coefficient {:.4g}): the grid "
                         "does not bracket the optimum; add smaller and larger models",
                         mn.curve.a));
      continue;
    }
    const double xs = mn.curve.argmin();
    mn.interior =
        xs >= *std::min_element(x.begin(), x.end()) && xs <= *std::max_element(x.begin(), x.end());
    mn.opt_tokens = std::pow(10.0, xs);
    mn.opt_loss = mn.curve(xs);
    mn.opt_params_6n = c / (6.0 * mn.opt_tokens);
    if (f.has_math) mn.opt_math_loss = fit_quadratic(x, m)(xs);
    f.minima.push_back(mn);
    cs.push_back(c);
    ds.push_back(mn.opt_tokens);
    ls.push_back(mn.opt_loss);
    ms.push_back(mn.opt_math_loss);
  }
  if (cs.size() < 2) {
    std::string why;
    for (const auto& [c, r] : f.excluded) why += fmt::format("\n  budget {:.3g} FLOPs: {}", c, r);
    fail("scaling fit needs at least 2 usable compute budgets, got {} of {}{}", cs.size(),
         by_budget.size(), why);
  }
  f.tokens_vs_compute = fit_power_law(cs, ds);
  f.loss_vs_compute = fit_power_law(cs, ls);
  if (f.has_math) f.math_vs_compute = fit_power_law(cs, ms);
  if (target_budget > 0) {
    f.pred_tokens = f.tokens_vs_compute(target_budget);
    f.pred_params_6n = target_budget / (6.0 * f.pred_tokens);
    f.pred_loss = f.loss_vs_compute(target_budget);
    if (f.has_math) f.pred_math_loss = f.math_vs_compute(target_budget);
  }
  return f;
}

nlohmann::json to_json(const ScalingFit& f) {
  nlohmann::json mins = nlohmann::json::array();
  for (const auto& m : f.minima) {
    nlohmann::json j = {{"budget", m.budget},
                        {"parabola", {{"a", m.curve.a}, {"b", m.curve.b}, {"c", m.curve.c}}},
                        {"opt_tokens", m.opt_tokens},
                        {"opt_loss", m.opt_loss},
                        {"opt_params_6n", m.opt_params_6n},
                        {"interior", m.interior}};
    if (std::isfinite(m.opt_math_loss)) j["opt_math_loss"] = m.opt_math_loss;
    mins.push_back(j);
  }
  nlohmann::json excl = nlohmann::json::array();
  for (const auto& [c, r] : f.excluded) excl.push_back({{"budget", c}, {"reason", r}});
  nlohmann::json j = {
      {"isoflops", mins},
      {"excluded_budgets", excl},
      {"tokens_vs_compute",
       {{"form", "D*(C) = A * C^alpha"},
        {"A", f.tokens_vs_compute.A},
        {"alpha", f.tokens_vs_compute.alpha},
        {"r2", f.tokens_vs_compute.r2}}},
      {"loss_vs_compute",
       {{"form", "L*(C) = B * C^beta"},
        {"B", f.loss_vs_compute.A},
        {"beta", f.loss_vs_compute.alpha},
        {"r2", f.loss_vs_compute.r2}}},
  };
  if (f.has_math)
    j["math_nll_vs_compute"] = {{"form", "NLL*(C) = B * C^beta"},
                                {"B", f.math_vs_compute.A},
                                {"beta", f.math_vs_compute.alpha},
                                {"r2", f.math_vs_compute.r2}};
  if (f.target_budget > 0) {
    j["prediction"] = {{"budget", f.target_budget},
                       {"tokens", f.pred_tokens},
                       {"params_6n", f.pred_params_6n},
                       {"eval_loss", f.pred_loss}};
    if (f.has_math) j["prediction"]["math_nll"] = f.pred_math_loss;
  }
  return j;
}

}  // namespace llama3::scaling
