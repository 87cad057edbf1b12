#include "runtime/log/progress.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>

namespace llama3::log {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

std::string format_eta(double s) {
  if (!(s >= 0) || s > 1e7) return "?";
  const int64_t t = int64_t(s + 0.5);
  return t >= 3600 ? fmt::format("{}h{:02}m", t / 3600, t % 3600 / 60)
                   : fmt::format("{}m{:02}s", t / 60, t % 60);
}

ProgressLine::ProgressLine(ProgressOptions opts) : o_(std::move(opts)) {
  tty_ = o_.tty < 0 ? isatty(fileno(stdout)) != 0 : o_.tty != 0;
}

ProgressLine::~ProgressLine() {
  end_line();
}

void ProgressLine::end_line() {
  if (line_open_) {
    std::fputc('\n', stdout);
    std::fflush(stdout);
    line_open_ = false;
  }
}

std::string ProgressLine::format(const ProgressUpdate& u) const {
  std::string s = o_.stage.empty() ? "" : o_.stage + "  ";
  s += o_.total_steps > 0 ? fmt::format("step {}/{}", u.step, o_.total_steps)
                          : fmt::format("step {}", u.step);
  s += fmt::format("  loss {:.4f}  lr {:.2e}  {:.0f} tok/s", u.loss, u.lr, u.tokens_per_s);
  if (o_.peak_flops > 0)
    s += fmt::format("  {:.1f}% {}", 100.0 * u.flops_per_s / o_.peak_flops, o_.peak_name);
  if (o_.total_steps > 0 && steps_timed_ > 0)
    s += "  ETA " +
         format_eta(step_time_sum_ / double(steps_timed_) * double(o_.total_steps - u.step));
  return s;
}

void ProgressLine::update(const ProgressUpdate& u) {
  step_time_sum_ += u.step_seconds;
  ++steps_timed_;
  const double t = now_s();
  const bool last = o_.total_steps > 0 && u.step >= o_.total_steps;
  const bool first = steps_timed_ == 1;
  const double interval = tty_ ? o_.tty_interval_s : o_.plain_interval_s;
  if (!first && !last && t - last_print_ < interval) return;
  last_print_ = t;
  const std::string line = format(u);
  if (tty_) {
    std::fprintf(stdout, "\r%s\x1b[K", line.c_str());
    std::fflush(stdout);
    line_open_ = true;
    if (last) end_line();
  } else {
    spdlog::info("{}", line);
  }
}

void ProgressLine::message(const std::string& text) {
  end_line();
  spdlog::info("{}", text);
}

}  // namespace llama3::log
