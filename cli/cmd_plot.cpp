// `llama3 plot RUN_DIR`: PNG charts of a run's metrics in RUN_DIR/plots/: an overview of the
// training loss across stages, and per stage its loss (train + eval), learning rate,
// throughput, % of GEMM peak and other eval curves (eval_*, niah_*), when logged.
#include <filesystem>

#include "cli/flags.h"
#include "runtime/log/metrics.h"
#include "runtime/plot/chart.h"

namespace fs = std::filesystem;

namespace llama3::cli {

namespace {
constexpr const char* kUsage =
    "usage: llama3 plot RUN_DIR [--out DIR]\n"
    "  Reads RUN_DIR/state.json and RUN_DIR/<stage>/metrics.jsonl; writes PNGs to RUN_DIR/plots "
    "(or DIR).";

plot::Series to_series(const std::string& name, const log::Series& s, double x_offset = 0) {
  plot::Series out;
  out.name = name;
  for (const auto& [step, v] : s) {
    out.x.push_back(double(step) + x_offset);
    out.y.push_back(v);
  }
  return out;
}

std::string file_name(const std::string& stage) {
  std::string s = stage;
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') c = '_';
  return s;
}
}  // namespace

std::vector<std::string> plot_run(const std::string& run_dir, const std::string& out_dir) {
  const auto stages = log::read_run(run_dir);
  fs::create_directories(out_dir);
  std::vector<std::string> written;
  auto save = [&](const plot::Chart& c, const std::string& name) {
    const std::string p = (fs::path(out_dir) / name).string();
    plot::write_png(p, plot::render(c));
    written.push_back(p);
  };

  // Overview: training loss over all stages, steps laid end to end.
  plot::Chart all;
  all.title = "Training loss, all stages";
  all.xlabel = "step (stages end to end)";
  all.ylabel = "loss";
  double offset = 0;
  for (const auto& s : stages) {
    auto it = s.series.find("loss");
    if (it == s.series.end() || it->second.empty()) continue;
    all.series.push_back(to_series(s.name, it->second, offset));
    offset += double(it->second.back().first);
  }
  if (!all.series.empty()) save(all, "loss.png");

  for (const auto& s : stages) {
    const std::string base = file_name(s.name);
    auto has = [&](const std::string& k) { return s.series.count(k) && !s.series.at(k).empty(); };
    if (has("loss") || has("eval_loss")) {
      plot::Chart c;
      c.title = s.name + ": loss";
      c.xlabel = "step";
      c.ylabel = "loss (nats/token)";
      if (has("loss")) c.series.push_back(to_series("train loss", s.series.at("loss")));
      if (has("eval_loss")) {
        auto e = to_series("eval loss", s.series.at("eval_loss"));
        e.markers = true;
        c.series.push_back(e);
      }
      save(c, base + "_loss.png");
    }
    auto single = [&](const std::string& key, const std::string& title, const std::string& ylabel,
                      const std::string& suffix) {
      if (!has(key)) return;
      plot::Chart c;
      c.title = s.name + ": " + title;
      c.xlabel = "step";
      c.ylabel = ylabel;
      c.series.push_back(to_series(key, s.series.at(key)));
      save(c, base + suffix);
    };
    single("lr", "learning rate", "lr", "_lr.png");
    single("tokens_per_s", "throughput", "tokens/s", "_throughput.png");
    single("pct_gemm_peak", "% of GEMM peak", "% of peak", "_gemm_peak.png");
    single("mfu", "MFU", "% of the GPUs' peak", "_mfu.png");
    single("grad_norm", "gradient norm", "global grad norm", "_grad_norm.png");
    plot::Chart ev;
    ev.title = s.name + ": eval metrics";
    ev.xlabel = "step";
    ev.ylabel = "value";
    for (const auto& [k, ser] : s.series)
      if ((k.rfind("eval_", 0) == 0 && k != "eval_loss") || k.rfind("niah_", 0) == 0) {
        auto e = to_series(k, ser);
        e.markers = true;
        ev.series.push_back(e);
      }
    if (!ev.series.empty()) save(ev, base + "_eval.png");
  }
  return written;
}

int cmd_plot(const Args& args) {
  Flags f(args, {"--out"}, {}, kUsage);
  LLAMA3_CHECK(f.positional().size() == 1, "expected one RUN_DIR\n{}", kUsage);
  const std::string run = f.positional()[0];
  const auto files = plot_run(run, f.str("--out", (fs::path(run) / "plots").string()));
  LLAMA3_CHECK(!files.empty(),
               "{}: no metrics to plot (no stage has a metrics.jsonl with numeric fields)", run);
  for (const auto& p : files) fmt::print("wrote {}\n", p);
  return 0;
}

}  // namespace llama3::cli
