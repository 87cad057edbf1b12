#include "runtime/log/metrics.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "runtime/core/error.h"
#include "runtime/log/tfevents.h"

namespace fs = std::filesystem;

namespace llama3::log {

namespace {
// A run killed mid-write leaves a last line without its newline; appending after it would
// glue the next line onto it. Cut the file back to its last complete line.
void drop_torn_last_line(const std::string& path) {
  if (!fs::exists(path)) return;
  const auto size = fs::file_size(path);
  if (size == 0) return;
  std::ifstream in(path, std::ios::binary);
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (data.back() == '\n') return;
  const size_t nl = data.rfind('\n');
  fs::resize_file(path, nl == std::string::npos ? 0 : nl + 1);
}
}  // namespace

MetricsWriter::MetricsWriter(const std::string& stage_dir, const std::string& stage_name,
                             const MetricsOptions& opts)
    : stage_(stage_name), path_((fs::path(stage_dir) / "metrics.jsonl").string()) {
  fs::create_directories(stage_dir);
  drop_torn_last_line(path_);
  f_ = std::fopen(path_.c_str(), "ab");
  LLAMA3_CHECK(f_, "cannot open {} for appending: {}", path_, std::strerror(errno));
  if (opts.tensorboard)
    events_ = std::make_unique<EventWriter>((fs::path(stage_dir) / "tb").string());
}

MetricsWriter::~MetricsWriter() {
  if (f_) std::fclose(f_);
}

std::string MetricsWriter::events_path() const {
  return events_ ? events_->path() : std::string();
}

void MetricsWriter::log(int64_t step, const nlohmann::json& fields) {
  LLAMA3_CHECK(fields.is_object(), "MetricsWriter::log: fields must be a JSON object, got {}",
               fields.dump());
  nlohmann::json line = {{"stage", stage_}, {"step", step}};
  std::vector<std::pair<std::string, float>> scalars;
  for (auto it = fields.begin(); it != fields.end(); ++it) {
    if (it.key() == "stage" || it.key() == "step") continue;
    line[it.key()] = it.value();
    if (it.value().is_number()) scalars.emplace_back(it.key(), it.value().get<float>());
  }
  // nlohmann writes non-finite numbers as null, which readers skip.
  const std::string s = line.dump() + "\n";
  LLAMA3_CHECK(std::fwrite(s.data(), 1, s.size(), f_) == s.size(), "{}: write failed: {}", path_,
               std::strerror(errno));
  std::fflush(f_);
  if (events_) {
    const double now =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    events_->scalars(step, scalars, now);
  }
}

void MetricsWriter::flush() {
  std::fflush(f_);
  if (events_) events_->flush();
}

std::map<std::string, Series> read_metrics_jsonl(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  LLAMA3_CHECK(in, "cannot open {}", path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  // Per field: step -> last value.
  std::map<std::string, std::map<int64_t, double>> by_step;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(lines[i]);
    } catch (const std::exception& e) {
      if (i + 1 == lines.size()) break;  // torn last line of a killed run
      fail("{}:{}: invalid JSON: {}", path, i + 1, e.what());
    }
    LLAMA3_CHECK(j.is_object() && j.contains("step") && j["step"].is_number_integer(),
                 "{}:{}: a metrics line must be an object with an integer \"step\"", path, i + 1);
    const int64_t step = j["step"].get<int64_t>();
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.key() != "step" && it.value().is_number())
        by_step[it.key()][step] = it.value().get<double>();
  }
  std::map<std::string, Series> out;
  for (auto& [k, m] : by_step) out[k] = Series(m.begin(), m.end());
  return out;
}

std::vector<StageMetrics> read_run(const std::string& run_dir) {
  LLAMA3_CHECK(fs::is_directory(run_dir), "run directory {} does not exist", run_dir);
  std::vector<std::string> names;
  std::vector<std::string> finished;
  const fs::path state = fs::path(run_dir) / "state.json";
  if (fs::exists(state)) {
    std::ifstream in(state);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
      fail("{}: invalid JSON: {}", state.string(), e.what());
    }
    if (j.contains("finished")) {
      LLAMA3_CHECK(j["finished"].is_array(), "{}: \"finished\" must be a list of stage names",
                   state.string());
      for (const auto& s : j["finished"]) finished.push_back(s.get<std::string>());
    }
  }
  names = finished;
  std::vector<std::string> others;
  for (const auto& e : fs::directory_iterator(run_dir)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && fs::exists(e.path() / "metrics.jsonl") &&
        std::find(names.begin(), names.end(), n) == names.end())
      others.push_back(n);
  }
  std::sort(others.begin(), others.end());
  names.insert(names.end(), others.begin(), others.end());

  std::vector<StageMetrics> out;
  for (const auto& n : names) {
    StageMetrics s;
    s.name = n;
    s.dir = (fs::path(run_dir) / n).string();
    s.finished = std::find(finished.begin(), finished.end(), n) != finished.end();
    const fs::path m = fs::path(s.dir) / "metrics.jsonl";
    if (fs::exists(m)) s.series = read_metrics_jsonl(m.string());
    const fs::path fj = fs::path(s.dir) / "final.json";
    if (fs::exists(fj)) {
      std::ifstream in(fj);
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(in);
      } catch (const std::exception& e) {
        fail("{}: invalid JSON: {}", fj.string(), e.what());
      }
      LLAMA3_CHECK(j.is_object(), "{}: expected a flat object {{metric: number}}", fj.string());
      for (auto it = j.begin(); it != j.end(); ++it)
        if (it.value().is_number()) s.final[it.key()] = it.value().get<double>();
      s.final_from_json = true;
    } else {
      for (const auto& [k, ser] : s.series)
        if (!ser.empty()) s.final[k] = ser.back().second;
    }
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace llama3::log
