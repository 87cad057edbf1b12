// Scaling-law fits (Llama 3 paper, 3.2.1): per compute budget, a second-degree polynomial
// of loss against log10(training tokens) whose minimum is the compute-optimal token count;
// across budgets, the power law D*(C) = A * C^alpha fitted by least squares in log space;
// and extrapolation of the optimal loss (and a downstream NLL proxy), each a power law of C,
// to a larger budget.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace llama3::scaling {

// y = a x^2 + b x + c (least squares). Throws with fewer than 3 points or distinct x.
struct Quadratic {
  double a = 0, b = 0, c = 0;
  double operator()(double x) const { return (a * x + b) * x + c; }
  double argmin() const { return -b / (2 * a); }  // meaningful when a > 0
};
Quadratic fit_quadratic(const std::vector<double>& x, const std::vector<double>& y);

// y = slope x + intercept (least squares); r2 is the coefficient of determination.
struct Linear {
  double slope = 0, intercept = 0, r2 = 0;
  double operator()(double x) const { return slope * x + intercept; }
};
Linear fit_linear(const std::vector<double>& x, const std::vector<double>& y);

// y = A x^alpha, fitted as log10 y = alpha log10 x + log10 A. Inputs must be positive.
struct PowerLaw {
  double A = 0, alpha = 0, r2 = 0;
  double operator()(double x) const;
};
PowerLaw fit_power_law(const std::vector<double>& x, const std::vector<double>& y);

// One training run of a sweep.
struct SweepRun {
  double budget = 0;  // the nominal compute budget C (FLOPs)
  double flops = 0;   // FLOPs actually spent (steps are whole)
  double tokens = 0;  // training tokens D
  double params = 0;  // all parameters
  double flops_per_token = 0;
  int64_t dim = 0, n_layers = 0;
  double eval_loss = 0;    // held-out loss on the manifest's eval shard
  double math_loss = NAN;  // held-out loss on math problems (downstream proxy); NaN if absent
  double seconds = 0;
};
nlohmann::json to_json(const SweepRun& r);
SweepRun sweep_run_from_json(const nlohmann::json& j, const std::string& where);

// The IsoFLOPs minimum of one budget.
struct IsoflopsMin {
  double budget = 0;
  Quadratic curve;             // eval loss vs log10(tokens)
  double opt_tokens = 0;       // 10^argmin
  double opt_loss = 0;         // the curve's value there
  double opt_params_6n = 0;    // C / (6 D*): the compute-optimal size in 6ND accounting
  double opt_math_loss = NAN;  // the math-loss curve at the same log10(tokens)
  bool interior = false;       // argmin inside the sampled token range (else extrapolated)
};

struct ScalingFit {
  std::vector<IsoflopsMin> minima;
  // Budgets left out of the power-law fit, with the reason (too few runs, not convex: the
  // grid does not bracket the optimum there).
  std::vector<std::pair<double, std::string>> excluded;
  PowerLaw tokens_vs_compute;  // D*(C) = A C^alpha
  // L*(C) = B C^beta and the math NLL at the optimum likewise: power laws (beta < 0) stay
  // positive when extrapolated, unlike a line in log C.
  PowerLaw loss_vs_compute;
  PowerLaw math_vs_compute;  // only if every run has a math loss
  bool has_math = false;
  double target_budget = 0;
  double pred_tokens = 0, pred_params_6n = 0, pred_loss = 0, pred_math_loss = NAN;
};

// Each budget needs >= 3 runs and a convex parabola, else it is excluded (listed in
// `excluded`); at least 2 budgets must remain, else the error lists why each was excluded.
ScalingFit fit_scaling(const std::vector<SweepRun>& runs, double target_budget);
nlohmann::json to_json(const ScalingFit& f);

}  // namespace llama3::scaling
