// The Trainer's captured step (TrainerConfig::cuda_graph: the whole step recorded once as a
// CUDA graph and replayed) against its eager step on the same device: equal losses, weights
// and optimizer state bit for bit through learning-rate changes, clipping, gradient
// accumulation, document masks, a skipped non-finite step and a change of step layout, in f32
// and bf16 mixed precision. Runs on cuda:0 (a GPU, or the emulated device of
// tests/unit/cuda_emu); skips without one, and under CUDA_LAUNCH_BLOCKING=1, which graphs do
// not support.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "runtime/autograd/autograd.h"
#include "runtime/core/rng.h"
#include "runtime/cuda/cuda_backend.h"
#include "text/train/trainer.h"

using namespace llama3;

namespace {

// Batch n is a function of n only, so two trainers see the same data. Micro-batch `odd_at`
// has a few targets < 0 (the captured loss counts them on the device: still a replay), and
// micro-batch `no_docs_at` has no document ids (another step layout: it runs eagerly).
class FixedSource : public text::BatchSource {
 public:
  FixedSource(int64_t B, int64_t T, int64_t V, int64_t odd_at, int64_t no_docs_at = -1)
      : B_(B), T_(T), V_(V), odd_(odd_at), no_docs_(no_docs_at) {}
  data::Batch next() override {
    Rng rng(9, uint64_t(pos_));
    data::Batch b;
    b.batch_size = B_, b.seq_len = T_;
    for (int64_t i = 0; i < B_ * T_; ++i) {
      b.tokens.push_back(int32_t(rng.below(V_)));
      b.targets.push_back(pos_ == odd_ && i % 5 == 0 ? -1 : int32_t(rng.below(V_)));
      if (pos_ != no_docs_) b.doc_ids.push_back(int32_t((i % T_) * 2 / T_));
    }
    ++pos_;
    return b;
  }
  nlohmann::json state() const override { return {{"pos", pos_}}; }
  void restore(const nlohmann::json& s) override { pos_ = s.at("pos").get<int64_t>(); }

 private:
  int64_t B_, T_, V_, odd_, no_docs_, pos_ = 0;
};

std::vector<uint32_t> bits(const Tensor& t) {
  const std::vector<float> v = t.to(Device::cpu()).to_vector<float>();
  std::vector<uint32_t> b(v.size());
  std::memcpy(b.data(), v.data(), v.size() * sizeof(float));
  return b;
}

// Element 5 of a parameter, on any device.
void set_element(Tensor& p, float v) {
  Tensor el = p.view({-1}).narrow(0, 5, 1);
  el.copy_(Tensor::full({1}, v, DType::f32, Device::cpu()));
}

// Why a graph test cannot run here, or empty: no CUDA device, or CUDA_LAUNCH_BLOCKING=1
// (under which graphs cannot be captured).
std::string graphs_unavailable() {
  if (!cuda_init()) return "no CUDA device";
  if (const char* b = std::getenv("CUDA_LAUNCH_BLOCKING"); b && b[0] == '1')
    return "CUDA graphs cannot be captured under CUDA_LAUNCH_BLOCKING=1";
  return "";
}

class CudaGraphTrainer : public ::testing::TestWithParam<ops::Precision> {};

TEST_P(CudaGraphTrainer, CapturedStepsEqualEagerSteps) {
  if (const std::string why = graphs_unavailable(); !why.empty()) GTEST_SKIP() << why;
  const auto cfg = text::llama3_flavour("debug");
  text::TrainerConfig tc;
  tc.steps = 9, tc.grad_accum = 2;
  tc.adamw.lr = 3e-3f, tc.adamw.max_grad_norm = 0.5f;                       // clipping on
  tc.schedule.peak = 3e-3f, tc.schedule.warmup = 2, tc.schedule.total = 9;  // lr changes each step
  text::LlamaModel eager_m(cfg, 13), graph_m(cfg, 13);
  eager_m.options().precision = graph_m.options().precision = GetParam();
  eager_m.to(Device::cuda(0));
  graph_m.to(Device::cuda(0));
  // Micro-batch 8 (step 5's first) has targets < 0: replayed. Micro-batch 10 (step 6's first)
  // has no document ids: steps 6 and 7 run eagerly, 8 captures again.
  FixedSource es(2, 16, cfg.vocab_size, 8, 10), gs(2, 16, cfg.vocab_size, 8, 10);
  text::Trainer eager(eager_m, tc, es);
  text::TrainerConfig gc = tc;
  gc.cuda_graph = true;
  text::Trainer graph(graph_m, gc, gs);
  // A norm weight poisons step 4: read in f32 in either precision (the matrices have bf16
  // copies in bf16 mixed precision).
  Tensor& poison_e = eager_m.parameter("model.norm.weight");
  Tensor& poison_g = graph_m.parameter("model.norm.weight");
  std::string replays;
  for (int s = 0; s < 9; ++s) {
    SCOPED_TRACE("step " + std::to_string(s + 1));
    const float saved = poison_e.to(Device::cpu()).to_vector<float>()[5];
    if (s == 3) set_element(poison_e, INFINITY), set_element(poison_g, INFINITY);
    const text::StepStats a = eager.step(), b = graph.step();
    if (s == 3) {
      EXPECT_TRUE(a.skipped);
      set_element(poison_e, saved), set_element(poison_g, saved);
    }
    EXPECT_FALSE(a.graph);
    replays += b.graph ? 'G' : 'e';
    EXPECT_EQ(b.skipped, a.skipped);
    if (!a.skipped) {
      EXPECT_EQ(b.loss, a.loss);
      EXPECT_NEAR(b.grad_norm, a.grad_norm, 1e-6 * a.grad_norm) << "reported in f32";
    }
    EXPECT_EQ(b.lr, a.lr);
  }
  // Eager: step 1 (the layout's first), 6 (no document ids) and 7 (the layout's first again);
  // replayed: 2, 3, 4 (the skipped one), 5 (targets < 0), 8, 9. In bf16 step 2 runs eagerly
  // too: step 1 wrote the bf16 weight copies, which the captured GEMMs then read (another
  // layout).
  EXPECT_EQ(replays, GetParam() == ops::Precision::f32 ? "eGGGGeeGG" : "eeGGGeeGG");
  EXPECT_EQ(graph.skipped_steps(), 1);
  EXPECT_EQ(graph.optimizer().steps(), eager.optimizer().steps());
  auto pa = eager_m.named_parameters(), pb = graph_m.named_parameters();
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_EQ(bits(*pb[i].tensor), bits(*pa[i].tensor)) << pa[i].name;
  for (auto& [name, t] : eager.optimizer().state_tensors())
    EXPECT_EQ(bits(graph.optimizer().state_tensors().at(name)), bits(t)) << name;
}

// A step whose host code reads the device (here a gradient hook calling item()) cannot be
// captured: the trainer says so once and trains on eagerly, with the eager results.
TEST(CudaGraphTrainerFallback, UncapturableStepRunsEagerly) {
  if (const std::string why = graphs_unavailable(); !why.empty()) GTEST_SKIP() << why;
  const auto cfg = text::llama3_flavour("debug");
  text::TrainerConfig tc;
  tc.steps = 4;
  tc.schedule.peak = 3e-3f, tc.schedule.warmup = 1, tc.schedule.total = 4;
  text::LlamaModel eager_m(cfg, 21), graph_m(cfg, 21);
  eager_m.to(Device::cuda(0));
  graph_m.to(Device::cuda(0));
  double seen = 0;
  for (text::LlamaModel* m : {&eager_m, &graph_m})
    m->parameter("model.norm.weight").meta()->post_accumulate_hooks.push_back([&](Tensor& g) {
      seen += g.view({-1}).narrow(0, 0, 1).item();
    });
  FixedSource es(2, 16, cfg.vocab_size, -1), gs(2, 16, cfg.vocab_size, -1);
  text::Trainer eager(eager_m, tc, es);
  text::TrainerConfig gc = tc;
  gc.cuda_graph = true;
  text::Trainer graph(graph_m, gc, gs);
  for (int s = 0; s < 4; ++s) {
    const text::StepStats a = eager.step(), b = graph.step();
    EXPECT_FALSE(b.graph) << "step " << s + 1;
    EXPECT_EQ(b.loss, a.loss) << "step " << s + 1;
  }
  EXPECT_NE(seen, 0.0);
  auto pa = eager_m.named_parameters(), pb = graph_m.named_parameters();
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_EQ(bits(*pb[i].tensor), bits(*pa[i].tensor)) << pa[i].name;
}

INSTANTIATE_TEST_SUITE_P(Precisions, CudaGraphTrainer,
                         ::testing::Values(ops::Precision::f32, ops::Precision::bf16),
                         [](const auto& info) {
                           return std::string(info.param == ops::Precision::f32 ? "f32" : "bf16");
                         });

}  // namespace
