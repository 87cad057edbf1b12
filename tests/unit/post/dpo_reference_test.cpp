// DPO against PyTorch (tests/reference/dpo_ref.py): the same tiny weights, pairs, mask and
// reference log-probs give the same sequence log-probs, loss and every parameter gradient.
#include <cmath>
#include <cstdlib>
#include <fstream>

#include "fixture.h"
#include "runtime/io/safetensors.h"

using namespace posttest;

namespace {
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(double(a[i]) - double(b[i])));
    den = std::max(den, std::abs(double(b[i])));
  }
  return num / std::max(den, 1e-30);
}
}  // namespace

TEST_F(PostTest, DpoLossAndGradientsMatchPyTorch) {
  LlamaConfig cfg = tiny_config(tok->vocab_size());
  LlamaModel m(cfg, 7);
  std::vector<Preference> pairs = {
      {{{Role::kSystem, "Be brief.", false}, {Role::kUser, "What is 2 + 3?", false}}, "5", "The answer is 6.", ""},
      {{{Role::kUser, "Write the word apple in uppercase.", false}}, "APPLE", "apple", ""},
      {{{Role::kUser, "hello", false}}, "hello world", "world", ""}};
  DpoRows rows = build_dpo_rows(*tok, pairs, tok->eos_id());
  std::vector<double> ref = sequence_logps(m, rows);
  for (size_t i = 0; i < ref.size(); ++i) ref[i] += 0.25 * double(i % 3) - 0.3;  // policy != reference
  const float beta = 0.1f, alpha = 0.2f;
  DpoLossParts parts = dpo_loss(m, rows, ref, beta, alpha);
  parts.loss.backward();

  io::TensorMap w;
  for (auto& p : m.named_parameters()) w[p.name] = *p.tensor;
  io::save_safetensors((dir / "model.safetensors").string(), w);
  std::vector<int32_t> mask(rows.loss_mask.begin(), rows.loss_mask.end());
  const int64_t R = 2 * rows.n;
  io::save_safetensors((dir / "batch.safetensors").string(),
                       {{"tokens", Tensor::from_vector(rows.tokens, {R, rows.T})},
                        {"labels", Tensor::from_vector(rows.labels, {R, rows.T})},
                        {"mask", Tensor::from_vector(mask, {R, rows.T})},
                        {"ref_logps", Tensor::from_vector(ref, {R})}});
  std::ofstream(dir / "config.json") << cfg.to_hf_json().dump();
  std::ofstream(dir / "dpo.json") << nlohmann::json({{"beta", beta}, {"alpha", alpha}}).dump();
  const std::string cmd = "/usr/bin/python3 " + std::string(LLAMA3_SOURCE_DIR) + "/tests/reference/dpo_ref.py " +
                          dir.string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  io::TensorMap r = io::load_safetensors((dir / "ref.safetensors").string());

  std::vector<double> lp = sequence_logps(m, rows), rlp = r.at("logps").to_vector<double>();
  for (size_t i = 0; i < lp.size(); ++i) EXPECT_NEAR(lp[i], rlp[i], 1e-4 * std::max(1.0, std::abs(rlp[i]))) << i;
  EXPECT_NEAR(parts.loss.item(), r.at("loss").item(), 1e-5 * std::abs(r.at("loss").item()));
  for (auto& p : m.named_parameters()) {
    SCOPED_TRACE(p.name);
    ASSERT_TRUE(p.tensor->grad().defined());
    EXPECT_LT(rel_err(p.tensor->grad().to_vector<float>(), r.at("grad." + p.name).to_vector<float>()), 1e-4);
  }
}
