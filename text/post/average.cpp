// Model averaging: a uniform or weighted mean of checkpoints of one architecture.
#include <cmath>
#include <filesystem>

#include "runtime/io/checkpoint.h"
#include "text/post/stages.h"

namespace llama3::text::post {

PostStageResult run_average(const AverageOptions& o) {
  const size_t n = o.models.size();
  LLAMA3_CHECK(n >= 1, "average: no checkpoints given");
  LLAMA3_CHECK(o.weights.empty() || o.weights.size() == n, "average: {} weights for {} checkpoints", o.weights.size(), n);
  std::vector<double> w(n, 1.0 / double(n));
  if (!o.weights.empty()) {
    double s = 0;
    for (double x : o.weights) {
      LLAMA3_CHECK(x >= 0 && std::isfinite(x), "average: weight {} must be finite and >= 0", x);
      s += x;
    }
    LLAMA3_CHECK(s > 0, "average: weights sum to {}", s);
    for (size_t i = 0; i < n; ++i) w[i] = o.weights[i] / s;
  }
  const nlohmann::json cfg0 = io::read_json(o.models[0] + "/config.json");
  io::TensorMap first = io::load_safetensors(o.models[0] + "/model.safetensors");
  std::map<std::string, std::vector<double>> acc;
  for (auto& [k, t] : first) acc[k].assign(static_cast<size_t>(t.numel()), 0.0);
  for (size_t i = 0; i < n; ++i) {
    io::verify_checkpoint(o.models[i]);
    const nlohmann::json cfg = io::read_json(o.models[i] + "/config.json");
    LLAMA3_CHECK(cfg == cfg0, "average: {}/config.json differs from {}/config.json", o.models[i], o.models[0]);
    io::TensorMap t = io::load_safetensors(o.models[i] + "/model.safetensors");
    for (auto& [k, v] : first)
      LLAMA3_CHECK(t.count(k), "average: {} has no tensor '{}' (present in {})", o.models[i], k, o.models[0]);
    for (auto& [k, v] : t) {
      auto it = first.find(k);
      LLAMA3_CHECK(it != first.end(), "average: tensor '{}' of {} is not in {}", k, o.models[i], o.models[0]);
      LLAMA3_CHECK(v.shape() == it->second.shape(), "average: tensor '{}' has shape {} in {} but {} in {}", k,
                   shape_str(v.shape()), o.models[i], shape_str(it->second.shape()), o.models[0]);
      std::vector<double> x = v.to_vector<double>();
      auto& a = acc[k];
      for (size_t j = 0; j < x.size(); ++j) a[j] += w[i] * x[j];
    }
  }
  io::TensorMap out;
  for (auto& [k, t] : first) out[k] = Tensor::from_vector(acc[k], t.shape()).to(t.dtype());
  {
    if (std::filesystem::path(o.out_dir).has_parent_path())
      std::filesystem::create_directories(std::filesystem::path(o.out_dir).parent_path());
    io::CheckpointWriter cw(o.out_dir);
    cw.tensors("model.safetensors", out, {{"format", "pt"}});
    cw.json("config.json", cfg0);
    cw.commit();
  }
  if (std::filesystem::exists(o.models[0] + "/tokenizer.model"))
    std::filesystem::copy_file(o.models[0] + "/tokenizer.model", o.out_dir + "/tokenizer.model",
                               std::filesystem::copy_options::overwrite_existing);
  nlohmann::json metrics = {{"models", int64_t(n)}, {"tensors", int64_t(out.size())}};
  write_final(o.out_dir, metrics);
  return {o.out_dir, metrics};
}

}  // namespace llama3::text::post
