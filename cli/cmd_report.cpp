// `llama3 report RUN_DIR`: a Markdown table of every stage's final metrics (final.json, or
// the last value of each metrics.jsonl field when a stage has none), printed and written to
// RUN_DIR/report.md; runs with post-training stages also get a per-round table.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "cli/flags.h"
#include "recipes/post_stages.h"
#include "runtime/log/metrics.h"

namespace llama3::cli {

namespace {
constexpr const char* kUsage =
    "usage: llama3 report RUN_DIR [--out FILE]\n"
    "  Writes RUN_DIR/report.md (or FILE): one row per stage, its final metrics as columns.";

std::string cell(double v) {
  if (!std::isfinite(v)) return fmt::format("{}", v);
  if (v == std::floor(v) && std::abs(v) < 1e15) return fmt::format("{:.0f}", v);
  const double a = std::abs(v);
  return (a >= 1e-3 && a < 1e6) ? fmt::format("{:.4g}", v) : fmt::format("{:.3e}", v);
}

// Loss-like columns first, then the rest alphabetically; per-step noise fields last.
int rank(const std::string& k) {
  static const std::vector<std::string> first = {"loss", "eval_loss", "step", "tokens", "time"};
  for (size_t i = 0; i < first.size(); ++i)
    if (k == first[i]) return int(i);
  if (k.rfind("eval_", 0) == 0) return 10;
  if (k.rfind("niah_", 0) == 0) return 11;
  if (k == "lr" || k == "grad_norm" || k == "tokens_per_s" || k == "pct_gemm_peak" || k == "mfu")
    return 30;
  return 20;
}
}  // namespace

std::string run_report_markdown(const std::string& run_dir) {
  const auto stages = log::read_run(run_dir);
  std::string md = fmt::format("# Run report: {}\n\n", run_dir);
  if (stages.empty())
    return md + "No stages found (no state.json entries and no */metrics.jsonl).\n";
  std::set<std::string> keys;
  for (const auto& s : stages)
    for (const auto& [k, v] : s.final) keys.insert(k);
  std::vector<std::string> cols(keys.begin(), keys.end());
  std::stable_sort(cols.begin(), cols.end(), [](const auto& a, const auto& b) {
    return rank(a) != rank(b) ? rank(a) < rank(b) : a < b;
  });
  md += "| stage | status | source |";
  for (const auto& c : cols) md += fmt::format(" {} |", c);
  md += "\n|---|---|---|";
  for (size_t i = 0; i < cols.size(); ++i) md += "---:|";
  md += "\n";
  for (const auto& s : stages) {
    md += fmt::format("| {} | {} | {} |", s.name, s.finished ? "finished" : "in progress",
                      s.final_from_json ? "final.json"
                                        : (s.series.empty() ? "-" : "metrics.jsonl (last values)"));
    for (const auto& c : cols) {
      auto it = s.final.find(c);
      md += fmt::format(" {} |", it == s.final.end() ? std::string() : cell(it->second));
    }
    md += "\n";
  }
  return md + recipes::post_rounds_markdown(run_dir);
}

int cmd_report(const Args& args) {
  Flags f(args, {"--out"}, {}, kUsage);
  LLAMA3_CHECK(f.positional().size() == 1, "expected one RUN_DIR\n{}", kUsage);
  const std::string run = f.positional()[0];
  const std::string md = run_report_markdown(run);
  const std::string out = f.str("--out", (std::filesystem::path(run) / "report.md").string());
  std::ofstream o(out, std::ios::trunc);
  LLAMA3_CHECK(o, "cannot write {}", out);
  o << md;
  fmt::print("{}\nwrote {}\n", md, out);
  return 0;
}

}  // namespace llama3::cli
