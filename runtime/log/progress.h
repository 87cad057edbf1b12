// A live progress line for training loops. On a terminal it redraws one line in place
// (`\r` + clear-to-end) with stage, step/total, loss, tokens/s, % of the GEMM peak (or MFU
// on GPUs), and ETA; when stdout is not a terminal (logs, CI) it prints plain spdlog lines,
// at most one every `plain_interval_s` seconds (the first and last steps always print).
#pragma once

#include <cstdint>
#include <string>

namespace llama3::log {

struct ProgressOptions {
  std::string stage;  // shown first, e.g. "pretrain"
  int64_t total_steps = 0;
  double peak_flops = 0;                // FLOP/s the percentage is taken of; 0: not shown
  std::string peak_name = "GEMM peak";  // "GEMM peak" on CPU, "MFU" against a GPU's spec
  double tty_interval_s = 0.1;          // redraw throttle on a terminal
  double plain_interval_s = 10;         // spdlog line throttle otherwise
  int tty = -1;                         // -1: isatty(stdout); 0/1 to force (tests)
};

struct ProgressUpdate {
  int64_t step = 0;  // steps done
  double loss = 0;
  double lr = 0;
  double tokens_per_s = 0;
  double flops_per_s = 0;
  double step_seconds = 0;  // wall time of this step (for the ETA)
};

class ProgressLine {
 public:
  explicit ProgressLine(ProgressOptions opts);
  ~ProgressLine();  // ends the in-place line with a newline

  void update(const ProgressUpdate& u);
  // A message that must not be overwritten (eval results, warnings): printed on its own line.
  void message(const std::string& text);
  // Formats the line (no \r, no newline); exposed for tests.
  std::string format(const ProgressUpdate& u) const;
  bool is_tty() const { return tty_; }

 private:
  void end_line();
  ProgressOptions o_;
  bool tty_ = false;
  bool line_open_ = false;
  double last_print_ = -1e300;
  double step_time_sum_ = 0;
  int64_t steps_timed_ = 0;
};

// "1h02m", "3m07s", "?" for unknown.
std::string format_eta(double seconds);

}  // namespace llama3::log
