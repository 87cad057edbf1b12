// `llama3 scaling sweep|fit`: IsoFLOPs scaling-law experiments (paper 3.2.1). `sweep` trains
// a grid of small models at several compute budgets and records their held-out losses in
// sweep.json; `fit` finds each budget's compute-optimal token count (minimum of a parabola
// in log tokens), fits D*(C) = A C^alpha, extrapolates loss and math NLL to a target
// budget, and draws isoflops.png and compute_optimal.png.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "cli/flags.h"
#include "runtime/io/checkpoint.h"
#include "runtime/plot/chart.h"
#include "text/scaling/fit.h"
#include "text/scaling/sweep.h"

namespace fs = std::filesystem;

namespace llama3::cli {

namespace {
constexpr const char* kUsage =
    "usage: llama3 scaling sweep CONFIG.json [--data DIR] [--out DIR]\n"
    "       llama3 scaling fit SWEEP.json [--target FLOPS] [--out DIR]\n"
    "  sweep: trains every model of CONFIG's grid at every budget (tokens = C / FLOPs per token),\n"
    "         writing DIR/sweep.json (default runs/scaling); re-running resumes.\n"
    "  fit:   writes fit.json, isoflops.png and compute_optimal.png next to SWEEP.json (or in "
    "DIR).\n"
    "  The default grid is text/scaling/default_sweep.json; build its data first with\n"
    "  `llama3 data demo --out runs/demo512 --vocab-size 512`.";

int sweep(const Flags& f) {
  LLAMA3_CHECK(f.positional().size() == 2, "scaling sweep: expected CONFIG.json\n{}", kUsage);
  const std::string path = f.positional()[1];
  auto cfg = scaling::SweepConfig::from_json(io::read_json(path), path);
  if (f.has("--data")) cfg.data_dir = f.str("--data");
  scaling::SweepOptions o;
  o.out_dir = f.str("--out", "runs/scaling");
  o.log = [](const std::string& s) { spdlog::info("{}", s); };
  const auto t0 = std::chrono::steady_clock::now();
  spdlog::info("scaling sweep: {} budgets x {} models, seq {} batch {}, data {}",
               cfg.budgets.size(), cfg.models.size(), cfg.seq_len, cfg.batch, cfg.data_dir);
  const auto runs = scaling::run_sweep(cfg, o);
  spdlog::info("scaling sweep: {} runs in {:.1f} s; wrote {}/sweep.json", runs.size(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
               o.out_dir);
  return 0;
}

void draw(const scaling::ScalingFit& fit, const std::vector<scaling::SweepRun>& runs,
          const std::string& dir) {
  std::map<double, std::vector<scaling::SweepRun>> by;
  for (const auto& r : runs) by[r.budget].push_back(r);
  plot::Chart c;
  c.title = "IsoFLOPs: eval loss vs training tokens";
  c.xlabel = "training tokens";
  c.ylabel = "held-out loss";
  c.log_x = true;
  int i = 0;
  plot::Series minima;
  for (auto& [budget, rs] : by) {
    std::sort(rs.begin(), rs.end(), [](auto& a, auto& b) { return a.tokens < b.tokens; });
    const auto m = std::find_if(fit.minima.begin(), fit.minima.end(),
                                [&](auto& x) { return x.budget == budget; });
    plot::Series pts;
    pts.name = fmt::format("C = {}{}", plot::tick_label(budget),
                           m == fit.minima.end() ? " (excluded)" : "");
    pts.lines = m == fit.minima.end();
    pts.dashed = true;
    pts.markers = true;
    pts.color = i;
    for (const auto& r : rs) pts.x.push_back(r.tokens), pts.y.push_back(r.eval_loss);
    c.series.push_back(pts);
    if (m != fit.minima.end()) {
      plot::Series curve;
      curve.color = i;
      const double lo = std::log10(rs.front().tokens), hi = std::log10(rs.back().tokens);
      const double a = std::min(lo, std::log10(m->opt_tokens)) - 0.1;
      const double b = std::max(hi, std::log10(m->opt_tokens)) + 0.1;
      for (int k = 0; k <= 60; ++k) {
        const double x = a + (b - a) * k / 60.0;
        curve.x.push_back(std::pow(10.0, x));
        curve.y.push_back(m->curve(x));
      }
      c.series.push_back(curve);
      plot::Series mn;
      mn.lines = false;
      mn.color = i;
      mn.x = {m->opt_tokens};
      mn.y = {m->opt_loss};
      c.highlights.push_back(mn);
    }
    ++i;
  }
  plot::write_png((fs::path(dir) / "isoflops.png").string(), plot::render(c));

  plot::Chart p;
  p.title = fmt::format("Compute-optimal tokens: D* = {:.3g} C^{:.3f}", fit.tokens_vs_compute.A,
                        fit.tokens_vs_compute.alpha);
  p.xlabel = "compute budget C (FLOPs)";
  p.ylabel = "optimal tokens D*";
  p.log_x = p.log_y = true;
  plot::Series pts;
  pts.name = "IsoFLOPs minima";
  pts.lines = false;
  pts.markers = true;
  for (const auto& m : fit.minima) pts.x.push_back(m.budget), pts.y.push_back(m.opt_tokens);
  plot::Series law;
  law.name = "power-law fit";
  law.dashed = true;
  double lo = std::log10(fit.minima.front().budget), hi = std::log10(fit.minima.back().budget);
  if (fit.target_budget > 0) hi = std::max(hi, std::log10(fit.target_budget));
  for (int k = 0; k <= 40; ++k) {
    const double x = std::pow(10.0, lo + (hi - lo) * k / 40.0);
    law.x.push_back(x);
    law.y.push_back(fit.tokens_vs_compute(x));
  }
  p.series = {pts, law};
  if (fit.target_budget > 0) {
    plot::Series t;
    t.lines = false;
    t.color = 3;
    t.x = {fit.target_budget};
    t.y = {fit.pred_tokens};
    p.highlights.push_back(t);
  }
  plot::write_png((fs::path(dir) / "compute_optimal.png").string(), plot::render(p));
}

int fit_cmd(const Flags& f) {
  LLAMA3_CHECK(f.positional().size() == 2, "scaling fit: expected SWEEP.json\n{}", kUsage);
  const std::string path = f.positional()[1];
  scaling::SweepConfig cfg;
  const auto runs = scaling::read_sweep(path, &cfg);
  const double target = f.real("--target", cfg.target_budget > 0 ? cfg.target_budget : 0.0);
  const auto fit = scaling::fit_scaling(runs, target);
  const std::string dir = f.str(
      "--out", fs::path(path).parent_path().empty() ? "." : fs::path(path).parent_path().string());
  fs::create_directories(dir);
  fmt::print("IsoFLOPs minima (parabola of held-out loss in log10 tokens):\n");
  fmt::print("  {:>10}  {:>12}  {:>10}  {:>12}  {:>9}  {}\n", "budget", "D* tokens", "loss*",
             "N*=C/6D*", "math*", "inside sampled range");
  for (const auto& m : fit.minima)
    fmt::print("  {:>10.3g}  {:>12.4g}  {:>10.4f}  {:>12.4g}  {:>9.4f}  {}\n", m.budget,
               m.opt_tokens, m.opt_loss, m.opt_params_6n, m.opt_math_loss,
               m.interior ? "yes" : "no (extrapolated)");
  for (const auto& [c, why] : fit.excluded) fmt::print("  {:>10.3g}  excluded: {}\n", c, why);
  fmt::print(
      "compute-optimal tokens: D*(C) = A * C^alpha with A = {:.4g}, alpha = {:.4f} (R^2 {:.3f}, "
      "log space)\n",
      fit.tokens_vs_compute.A, fit.tokens_vs_compute.alpha, fit.tokens_vs_compute.r2);
  fmt::print("optimal loss: L*(C) = {:.4g} * C^{:.4f} (R^2 {:.3f}, log space)\n",
             fit.loss_vs_compute.A, fit.loss_vs_compute.alpha, fit.loss_vs_compute.r2);
  if (fit.has_math)
    fmt::print("math NLL at the optimum: {:.4g} * C^{:.4f} (R^2 {:.3f}, log space)\n",
               fit.math_vs_compute.A, fit.math_vs_compute.alpha, fit.math_vs_compute.r2);
  if (target > 0) {
    fmt::print("prediction at C = {:.3g}: D* = {:.4g} tokens, N* = {:.4g} (6ND), eval loss {:.4f}",
               target, fit.pred_tokens, fit.pred_params_6n, fit.pred_loss);
    if (fit.has_math) fmt::print(", math NLL {:.4f}", fit.pred_math_loss);
    fmt::print("\n");
  }
  nlohmann::json j = scaling::to_json(fit);
  j["sweep"] = path;
  std::ofstream((fs::path(dir) / "fit.json").string(), std::ios::trunc) << j.dump(2) << '\n';
  draw(fit, runs, dir);
  fmt::print("wrote {0}/fit.json, {0}/isoflops.png, {0}/compute_optimal.png\n", dir);
  return 0;
}
}  // namespace

int cmd_scaling(const Args& args) {
  Flags f(args, {"--data", "--out", "--target"}, {}, kUsage);
  LLAMA3_CHECK(!f.positional().empty(), "scaling: expected sweep or fit\n{}", kUsage);
  const std::string sub = f.positional()[0];
  if (sub == "sweep") return sweep(f);
  if (sub == "fit") return fit_cmd(f);
  fail("scaling: unknown subcommand '{}' (known: sweep, fit)\n{}", sub, kUsage);
}

}  // namespace llama3::cli
