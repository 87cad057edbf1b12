// The Trainer on the emulated cuda:0 (cuda_backend_emu.cpp) against the same Trainer on the
// CPU: a few AdamW steps of the debug model with gradient accumulation, document masks,
// clipping, the multi-tensor gradient norm and (bf16) AdamW's bf16 weight copies, in f32 and
// in bf16 mixed precision, give the
// same losses and gradient norms at every step (within each precision's parity tolerance)
// and close weights. (AdamW normalises each update by its own gradient's size, so elements
// with near-zero gradients move by about lr either way on a rounding difference: the
// weights get a looser bound than the losses.)
#define LLAMA3_CUDA_EMU 1
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "runtime/core/rng.h"
#include "runtime/cuda/cuda_backend.h"
#include "tests/unit/cuda_emu/emu_util.h"
#include "text/train/trainer.h"

using namespace llama3;

namespace {

// Batch n is a function of n only, so two trainers see the same data.
class FixedSource : public text::BatchSource {
 public:
  FixedSource(int64_t B, int64_t T, int64_t V) : B_(B), T_(T), V_(V) {}
  data::Batch next() override {
    Rng rng(5, uint64_t(pos_++));
    data::Batch b;
    b.batch_size = B_, b.seq_len = T_;
    for (int64_t i = 0; i < B_ * T_; ++i) {
      b.tokens.push_back(int32_t(rng.below(V_)));
      b.targets.push_back(int32_t(rng.below(V_)));
      b.doc_ids.push_back(int32_t((i % T_) * 3 / T_));  // three documents per row
    }
    return b;
  }
  nlohmann::json state() const override { return {{"pos", pos_}}; }
  void restore(const nlohmann::json& s) override { pos_ = s.at("pos").get<int64_t>(); }

 private:
  int64_t B_, T_, V_, pos_ = 0;
};

class TrainerEmu : public ::testing::TestWithParam<ops::Precision> {};

TEST_P(TrainerEmu, CudaStepsMatchCpu) {
  ASSERT_TRUE(cuda_init()) << "the emulated device registers itself";
  const auto cfg = text::llama3_flavour("debug");
  text::TrainerConfig tc;
  tc.steps = 3, tc.grad_accum = 2;
  tc.adamw.lr = 3e-3f, tc.adamw.max_grad_norm = 0.5f;  // clipping on: the norm is used
  tc.schedule.peak = 3e-3f, tc.schedule.warmup = 1, tc.schedule.total = 3;
  text::LlamaModel cpu_model(cfg, 11), cuda_model(cfg, 11);
  cpu_model.options().precision = cuda_model.options().precision = GetParam();
  cuda_model.to(Device::cuda(0));
  FixedSource cpu_src(2, 24, cfg.vocab_size), cuda_src(2, 24, cfg.vocab_size);
  text::Trainer cpu_t(cpu_model, tc, cpu_src), cuda_t(cuda_model, tc, cuda_src);
  const bool bf16 = GetParam() == ops::Precision::bf16;
  for (int s = 0; s < 3; ++s) {
    const text::StepStats a = cpu_t.step(), b = cuda_t.step();
    EXPECT_FALSE(b.skipped) << "step " << s;
    EXPECT_NEAR(b.loss, a.loss, (bf16 ? 1e-2 : 1e-5) * std::abs(a.loss)) << "step " << s;
    EXPECT_NEAR(b.grad_norm, a.grad_norm, (bf16 ? 3e-2 : 1e-4) * a.grad_norm) << "step " << s;
  }
  // bf16: the GEMMs read AdamW's bf16 weight copies, written by the CUDA kernel; each equals
  // the cast of its weight bit for bit.
  if (bf16) {
    const ops::WeightCopyTable* copies = cuda_t.optimizer().bf16_copies();
    ASSERT_NE(copies, nullptr);
    size_t found = 0;
    for (auto& p : cuda_model.named_parameters()) {
      Tensor c = copies->find(*p.tensor);
      if (!c.defined()) continue;
      ++found;
      EXPECT_EQ(c.to(Device::cpu()).to_vector<float>(),
                p.tensor->to(DType::bf16).to(Device::cpu()).to_vector<float>())
          << p.name;
    }
    EXPECT_EQ(found, copies->size());
  }
  auto pa = cpu_model.named_parameters(), pb = cuda_model.named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pb[i].tensor->device(), Device::cuda(0)) << pb[i].name;
    EXPECT_LT(emu_test::rel_err(pb[i].tensor->to(Device::cpu()), *pa[i].tensor), bf16 ? 4e-2 : 1e-4)
        << pa[i].name;
  }
}

INSTANTIATE_TEST_SUITE_P(Precisions, TrainerEmu,
                         ::testing::Values(ops::Precision::f32, ops::Precision::bf16),
                         [](const auto& info) {
                           return std::string(info.param == ops::Precision::f32 ? "f32" : "bf16");
                         });

}  // namespace
