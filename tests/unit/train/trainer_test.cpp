// Trainer behaviour: exact resume, NaN/inf skipping, damaged checkpoints.
#include "text/train/trainer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <limits>

#include "runtime/autograd/autograd.h"
#include "runtime/backend/backend.h"
#include "runtime/io/checkpoint.h"

using namespace llama3;
namespace fs = std::filesystem;

namespace {

// Deterministic synthetic data: the batch at position n is a function of (seed, n).
class SyntheticSource : public text::BatchSource {
 public:
  SyntheticSource(int64_t B, int64_t T, int64_t V) : B_(B), T_(T), V_(V) {}
  data::Batch next() override {
    Rng rng(77, uint64_t(pos_++) * 1000003);
    data::Batch b;
    b.batch_size = B_, b.seq_len = T_;
    std::vector<int32_t> stream(B_ * T_ + 1);
    int32_t x = int32_t(rng.below(V_));
    for (auto& s : stream)
      s = x = int32_t((x * 3 + 1 + (rng.uniform() < 0.1 ? rng.below(V_) : 0)) % V_);
    for (int64_t i = 0; i < B_ * T_; ++i) {
      b.tokens.push_back(stream[i]);
      b.targets.push_back(stream[i + 1]);
      b.doc_ids.push_back(int32_t((i % T_) / (T_ / 2)));
    }
    return b;
  }
  nlohmann::json state() const override { return {{"pos", pos_}}; }
  void restore(const nlohmann::json& s) override { pos_ = s.at("pos").get<int64_t>(); }

 private:
  int64_t B_, T_, V_, pos_ = 0;
};

text::TrainerConfig small_cfg(int64_t steps) {
  text::TrainerConfig c;
  c.steps = steps;
  c.grad_accum = 2;
  c.adamw.lr = 3e-3f;
  c.schedule.peak = 3e-3f;
  c.schedule.warmup = 3;
  c.schedule.total = steps;
  c.schedule.decay = optim::Decay::cosine;
  return c;
}

struct TmpDir {
  fs::path p = fs::temp_directory_path() /
               ("llama3_train_" + std::to_string(::getpid()) + "_" + std::to_string(rand()));
  TmpDir() { fs::create_directories(p); }
  ~TmpDir() { fs::remove_all(p); }
};

}  // namespace

TEST(Trainer, ResumeIsBitExact) {
  auto cfg = text::llama3_flavour("debug");
  TmpDir tmp;
  std::vector<double> straight_losses, resumed_losses;
  text::LlamaModel a(cfg, 1);
  {
    SyntheticSource src(2, 32, cfg.vocab_size);
    text::Trainer t(a, small_cfg(20), src);
    for (int i = 0; i < 20; ++i) straight_losses.push_back(t.step().loss);
  }
  text::LlamaModel b(cfg, 1);
  {
    SyntheticSource src(2, 32, cfg.vocab_size);
    text::Trainer t(b, small_cfg(20), src);
    for (int i = 0; i < 10; ++i) t.step();
    t.save((tmp.p / "ckpt").string());
  }
  text::LlamaModel c(cfg, 999);  // different init: everything must come from the checkpoint
  {
    SyntheticSource src(2, 32, cfg.vocab_size);
    text::Trainer t(c, small_cfg(20), src);
    t.load((tmp.p / "ckpt").string());
    EXPECT_EQ(t.steps_done(), 10);
    for (int i = 0; i < 10; ++i) resumed_losses.push_back(t.step().loss);
  }
  for (int i = 0; i < 10; ++i)
    EXPECT_EQ(straight_losses[10 + i], resumed_losses[i]) << "step " << 11 + i;
  auto pa = a.named_parameters(), pc = c.named_parameters();
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_EQ(pa[i].tensor->to_vector<float>(), pc[i].tensor->to_vector<float>()) << pa[i].name;
  EXPECT_LT(straight_losses.back(), straight_losses.front());
}

TEST(Trainer, NonFiniteGradientSkipsTheUpdateAndReportsIt) {
  auto cfg = text::llama3_flavour("debug");
  text::LlamaModel m(cfg, 2);
  SyntheticSource src(2, 16, cfg.vocab_size);
  text::Trainer t(m, small_cfg(5), src);
  t.step();
  // Poison one gradient during the next backward only.
  bool poison = true;
  float poison_value = std::numeric_limits<float>::quiet_NaN();
  Tensor& w = m.parameter("model.layers.1.mlp.up_proj.weight");
  w.meta()->post_accumulate_hooks.push_back([&](Tensor& g) {
    if (poison) g.data<float>()[0] = poison_value;
  });
  std::vector<float> before = m.parameter("lm_head.weight").to_vector<float>();
  text::StepStats st = t.step();
  EXPECT_TRUE(st.skipped);
  EXPECT_EQ(t.skipped_steps(), 1);
  EXPECT_EQ(m.parameter("lm_head.weight").to_vector<float>(), before)
      << "weights changed on a skipped step";
  poison = false;
  st = t.step();
  EXPECT_FALSE(st.skipped);
  EXPECT_NE(m.parameter("lm_head.weight").to_vector<float>(), before);
  EXPECT_EQ(t.optimizer().steps(), 2);
  // An infinite element is caught as well (the gradient norm is the check).
  poison = true, poison_value = std::numeric_limits<float>::infinity();
  before = m.parameter("lm_head.weight").to_vector<float>();
  st = t.step();
  EXPECT_TRUE(st.skipped);
  EXPECT_EQ(t.skipped_steps(), 2);
  EXPECT_EQ(m.parameter("lm_head.weight").to_vector<float>(), before);
}

// bf16 mixed precision: AdamW's bf16 weight copies change nothing (the copy is the cast), are
// really what the GEMMs read (corrupting them changes the loss), and invalidation puts the
// cast back.
TEST(Trainer, Bf16WeightCopiesAreBitIdenticalAndUsed) {
  auto cfg = text::llama3_flavour("debug");
  text::LlamaModel a(cfg, 3), b(cfg, 3);
  a.options().precision = b.options().precision = ops::Precision::bf16;
  SyntheticSource sa(2, 16, cfg.vocab_size), sb(2, 16, cfg.vocab_size);
  text::TrainerConfig ca = small_cfg(8), cb = small_cfg(8);
  cb.bf16_weight_copies = false;
  text::Trainer ta(a, ca, sa), tb(b, cb, sb);
  for (int s = 0; s < 3; ++s) EXPECT_EQ(ta.step().loss, tb.step().loss) << "step " << s + 1;
  ASSERT_EQ(tb.optimizer().bf16_copies(), nullptr);
  auto* copies = const_cast<ops::WeightCopyTable*>(ta.optimizer().bf16_copies());
  ASSERT_NE(copies, nullptr);
  size_t found = 0;
  for (auto& p : a.named_parameters()) {
    Tensor c = copies->find(*p.tensor);
    if (!c.defined()) continue;
    ++found;
    EXPECT_EQ(c.to_vector<float>(), p.tensor->to(DType::bf16).to_vector<float>()) << p.name;
  }
  EXPECT_EQ(found, copies->size()) << "every matrix has a written copy";
  EXPECT_GT(found, 5u);
  auto pa = a.named_parameters(), pb = b.named_parameters();
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_EQ(pa[i].tensor->to_vector<float>(), pb[i].tensor->to_vector<float>()) << pa[i].name;

  // Invalidated copies are not used: corrupt them, invalidate, and the step is unchanged.
  for (size_t i = 0; i < copies->size(); ++i) copies->copy(i).zero_();
  ta.optimizer().invalidate_bf16_copies();
  EXPECT_EQ(ta.step().loss, tb.step().loss) << "invalidated copies were used";
  // Written copies are used: corrupted after the step, they change the next loss.
  for (size_t i = 0; i < copies->size(); ++i) copies->copy(i).zero_();
  EXPECT_NE(ta.step().loss, tb.step().loss) << "the copies were not used";
}

// load_model builds the model without drawing its weights (nn::SkipInitGuard): every
// parameter must then come from the file, bit for bit.
TEST(Checkpoint, LoadedModelHasTheSavedWeights) {
  auto cfg = text::llama3_flavour("debug");
  text::LlamaModel m(cfg, 3);
  TmpDir tmp;
  const std::string dir = (tmp.p / "model").string();
  text::save_model(m, dir);
  auto loaded = text::load_model(dir);
  auto a = m.named_parameters(), b = loaded->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].tensor->to_vector<float>(), b[i].tensor->to_vector<float>()) << a[i].name;
  }
}

TEST(Checkpoint, TruncatedOrMissingFilesAreReportedByName) {
  auto cfg = text::llama3_flavour("debug");
  text::LlamaModel m(cfg, 3);
  TmpDir tmp;
  const std::string dir = (tmp.p / "model").string();
  text::save_model(m, dir);
  EXPECT_NO_THROW(text::load_model(dir));
  fs::resize_file(dir + "/model.safetensors", fs::file_size(dir + "/model.safetensors") / 2);
  try {
    text::load_model(dir);
    FAIL() << "truncated checkpoint loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors is damaged"), std::string::npos)
        << e.what();
  }
  try {
    text::load_model((tmp.p / "nope").string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nope does not exist"), std::string::npos) << e.what();
  }
  // Without checksums (e.g. a file from elsewhere), the safetensors reader still names
  // the truncated tensor.
  io::save_safetensors((tmp.p / "x.safetensors").string(),
                       {{"w", Tensor::zeros({64, 64}, DType::f32)}});
  fs::resize_file(tmp.p / "x.safetensors", 200);
  try {
    io::load_safetensors((tmp.p / "x.safetensors").string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'w'"), std::string::npos) << e.what();
  }
}

TEST(Checkpoint, SavedModelRoundTripsExactly) {
  auto cfg = text::llama3_flavour("debug");
  text::LlamaModel m(cfg, 4);
  TmpDir tmp;
  text::save_model(m, (tmp.p / "m").string());
  auto back = text::load_model((tmp.p / "m").string());
  auto pa = m.named_parameters(), pb = back->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_EQ(pa[i].tensor->to_vector<float>(), pb[i].tensor->to_vector<float>());
}

TEST(LrSchedule, WarmupCosineAndLinearToZero) {
  optim::LrSchedule s{
      .peak = 1.f, .min_lr = 0.1f, .warmup = 10, .total = 110, .decay = optim::Decay::cosine};
  EXPECT_FLOAT_EQ(s.at(0), 0.1f);
  EXPECT_FLOAT_EQ(s.at(9), 1.f);
  EXPECT_FLOAT_EQ(s.at(60), 0.55f);
  EXPECT_FLOAT_EQ(s.at(110), 0.1f);
  optim::LrSchedule l{
      .peak = 2.f, .min_lr = 0.f, .warmup = 0, .total = 100, .decay = optim::Decay::linear};
  EXPECT_FLOAT_EQ(l.at(50), 1.f);
  EXPECT_EQ(l.at(100), 0.f);
}

// The captured-step form of AdamW (the CUDA graph step: clip factor, skip flag and learning
// rate read from a state tensor when the update runs) equals step() bit for bit, here on the
// CPU through the backend's host defaults, including a skipped step.
TEST(AdamW, CapturedStepMatchesStepBitForBit) {
  auto cfg = text::llama3_flavour("debug");
  text::LlamaModel ma(cfg, 4), mb(cfg, 4);
  optim::AdamWConfig oc;
  oc.lr = 3e-3f, oc.weight_decay = 0.1f, oc.max_grad_norm = 0.05f;  // clipping active
  optim::AdamW a(ma.named_parameters(), oc), b(mb.named_parameters(), oc);
  SyntheticSource src(2, 16, cfg.vocab_size);
  Tensor state = Tensor::zeros({AdamWDynamic::size}, DType::f32);
  const float lrs[] = {1e-3f, 3e-3f, 2e-3f, 5e-4f};
  for (int s = 0; s < 4; ++s) {
    text::BatchTensors bt = text::to_tensors(src.next());
    const bool poison = s == 2;  // a non-finite loss: both skip
    Tensor la = ma.loss(bt.tokens, bt.targets, bt.doc_ids), lb = mb.loss(bt.tokens, bt.targets, bt.doc_ids);
    la.backward(), lb.backward();
    if (poison) lb.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
    const double norm = a.grad_norm();
    if (!poison) {
      EXPECT_EQ(a.step(lrs[s], norm), norm);
    }
    b.set_captured_lr(state, lrs[s]);
    b.enqueue_captured_step(lb.detach(), state);
    const std::vector<float> st = state.to_vector<float>();
    EXPECT_EQ(st[AdamWDynamic::skip] != 0.f, poison) << "step " << s;
    if (!poison) {
      EXPECT_EQ(st[AdamWDynamic::norm], float(norm)) << "step " << s;
    }
    b.commit_captured_step(st[AdamWDynamic::skip] != 0.f);
    a.zero_grad(), b.zero_grad();
    EXPECT_EQ(a.steps(), b.steps()) << "step " << s;
  }
  auto pa = ma.named_parameters(), pb = mb.named_parameters();
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_EQ(pa[i].tensor->to_vector<float>(), pb[i].tensor->to_vector<float>()) << pa[i].name;
  for (auto& [name, t] : a.state_tensors())
    EXPECT_EQ(t.to_vector<float>(), b.state_tensors().at(name).to_vector<float>()) << name;
}
