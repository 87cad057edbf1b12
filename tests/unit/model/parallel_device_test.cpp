// ParallelLlama on the model's device. The parallel step with world size 1 (on CUDA the NCCL
// communicator of one rank where the build has NCCL, else the single-rank one) runs 3 AdamW
// steps and must match the plain single-process model on the same device (losses and every
// updated weight), and the plain CPU run within f32 / bf16 tolerances. The vocabulary-parallel
// embedding and cross-entropy (host softmax statistics, device GEMMs) must match their CPU
// values on a one-rank tp group. The CUDA cases skip without a device; the CPU harness runs
// everywhere, so the comparison code itself is exercised on CPU-only machines.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/core/rng.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/dist/communicator.h"
#include "runtime/optim/adamw.h"
#include "text/model/parallelize.h"
#include "text/model/vocab_parallel.h"

using namespace llama3;

namespace {

struct TrainRun {
  std::vector<double> losses;
  std::map<std::string, Tensor> weights;  // host tensors
  std::map<std::string, Tensor> initial;  // before the first step (host)
  std::string backend;                    // the world communicator's (parallel runs)
};

// 3 steps of the debug flavour (2 layers), batch 4 x seq 32 with document boundaries, AdamW
// lr 1e-2, eps 1e-3 (the setting of test_parallel_equivalence), clipping at 1.
TrainRun train(Device dev, bool parallel, ops::Precision prec) {
  text::LlamaConfig cfg = text::llama3_flavour("debug");
  cfg.n_layers = 2;
  const int64_t B = 4, T = 32;
  cfg.max_seq_len = std::max<int64_t>(cfg.max_seq_len, T);
  text::LlamaModel model(cfg, 3);
  model.options().precision = prec;
  TrainRun r;
  for (auto& np : model.named_parameters()) r.initial[np.name] = np.tensor->detach().clone();
  if (!dev.is_cpu()) model.to(dev);
  optim::AdamWConfig oc;
  oc.lr = 1e-2f, oc.eps = 1e-3f, oc.max_grad_norm = 1.f, oc.weight_decay = 0.f;
  std::unique_ptr<text::ParallelLlama> par;
  std::unique_ptr<optim::AdamW> opt;
  if (parallel) {
    auto world = dist::single_rank_communicator("world");
#if defined(LLAMA3_WITH_NCCL)
    world = dist::communicator_for_device(world, dev);  // NCCL with one rank on CUDA
#endif
    r.backend = world->backend();
    text::ParallelizeOptions po;
    po.verbose = false;
    par = std::make_unique<text::ParallelLlama>(
        model, dist::make_process_groups(dist::ParallelDims{}, world), po);
    EXPECT_EQ(par->device(), dev);
    opt = std::make_unique<optim::AdamW>(par->optimizer_params(), oc);
    opt->set_norm_reduction(par->norm_reduction());
  } else {
    opt = std::make_unique<optim::AdamW>(model.named_parameters(), oc);
  }
  for (int64_t step = 1; step <= 3; ++step) {
    Rng rng(11, uint64_t(step) * 100000);
    std::vector<int32_t> tok(size_t(B * T)), tgt(size_t(B * T)), doc(size_t(B * T));
    for (int64_t b = 0; b < B; ++b) {
      int32_t d = 0;
      for (int64_t t = 0; t < T; ++t) {
        const size_t i = size_t(b * T + t);
        tok[i] = int32_t(rng.below(uint64_t(cfg.vocab_size)));
        tgt[i] = t + 1 < T ? int32_t(rng.below(uint64_t(cfg.vocab_size))) : -1;
        if (t > 0 && rng.below(8) == 0) ++d;
        doc[i] = d;
      }
    }
    // Host inputs, as the trainer passes them: both paths move them to the model's device.
    const Tensor tokens = Tensor::from_vector(tok, {B, T}),
                 targets = Tensor::from_vector(tgt, {B, T});
    const Tensor docs = Tensor::from_vector(doc, {B, T});
    double loss;
    if (parallel) {
      loss = par->forward_backward(tokens, targets, docs);
    } else {
      Tensor l = model.loss(tokens, targets, docs);
      loss = l.item();
      l.backward();
    }
    opt->step(oc.lr);
    opt->zero_grad();
    r.losses.push_back(loss);
  }
  if (parallel) {
    r.weights = par->full_state_dict();
  } else {
    for (auto& np : model.named_parameters())
      r.weights[np.name] = np.tensor->detach().to(Device::cpu());
  }
  for (auto& [name, t] : r.weights) EXPECT_TRUE(t.device().is_cpu()) << name;
  return r;
}

// max |a - b| / max |b| over a tensor, as `llama3 parallel --reference`.
double max_rel(const Tensor& a, const Tensor& b) {
  auto x = a.to_vector<float>(), y = b.to_vector<float>();
  EXPECT_EQ(x.size(), y.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
    num = std::max(num, std::fabs(double(x[i]) - double(y[i])));
    den = std::max(den, std::fabs(double(y[i])));
  }
  return num / std::max(den, 1e-30);
}

void expect_close(const TrainRun& got, const TrainRun& ref, double loss_tol, double weight_tol,
                  const std::string& what) {
  ASSERT_EQ(got.losses.size(), ref.losses.size());
  for (size_t i = 0; i < ref.losses.size(); ++i) {
    EXPECT_TRUE(std::isfinite(got.losses[i])) << what << " step " << i + 1;
    EXPECT_LE(std::fabs(got.losses[i] - ref.losses[i]), loss_tol * std::fabs(ref.losses[i]))
        << what << " step " << i + 1 << ": " << got.losses[i] << " vs " << ref.losses[i];
  }
  ASSERT_EQ(got.weights.size(), ref.weights.size()) << what;
  double worst = 0;
  std::string worst_name;
  for (auto& [name, t] : ref.weights) {
    auto it = got.weights.find(name);
    ASSERT_NE(it, got.weights.end()) << what << ": no " << name;
    ASSERT_EQ(it->second.shape(), t.shape()) << what << ": " << name;
    const double e = max_rel(it->second, t);
    if (e > worst) worst = e, worst_name = name;
  }
  EXPECT_LE(worst, weight_tol) << what << ": worst weight " << worst_name;
}

// The steps changed every weight: a comparison of untouched weights would prove nothing.
void expect_trained(const TrainRun& r) {
  for (auto& [name, t] : r.weights) EXPECT_GT(max_rel(t, r.initial.at(name)), 1e-3) << name;
}

}  // namespace

TEST(ParallelDevice, CpuWorldOfOneMatchesThePlainProcess) {
  const TrainRun plain = train(Device::cpu(), false, ops::Precision::f32);
  const TrainRun par = train(Device::cpu(), true, ops::Precision::f32);
  expect_trained(par);
  expect_close(par, plain, 1e-6, 1e-5, "cpu parallel vs cpu plain");
  // Control: the bf16 run is measurably different, so the tolerances above can fail.
  const TrainRun bf = train(Device::cpu(), false, ops::Precision::bf16);
  double d = 0;
  for (size_t i = 0; i < bf.losses.size(); ++i)
    d = std::max(d, std::fabs(bf.losses[i] - plain.losses[i]));
  EXPECT_GT(d, 1e-6 * std::fabs(plain.losses[0]));
}

class ParallelDeviceCuda : public ::testing::TestWithParam<ops::Precision> {};

TEST_P(ParallelDeviceCuda, WorldOfOneMatchesPlainCudaAndCpu) {
  if (!cuda_init()) GTEST_SKIP() << "no CUDA device (cuda_init() returned false)";
  const ops::Precision prec = GetParam();
  const bool bf = prec == ops::Precision::bf16;
  const Device dev = Device::cuda(0);
  const TrainRun cpu = train(Device::cpu(), false, prec);
  const TrainRun plain = train(dev, false, prec);
  const TrainRun par = train(dev, true, prec);
#if defined(LLAMA3_WITH_NCCL)
  EXPECT_EQ(par.backend, "nccl");
#endif
  // Same kernels as the plain CUDA run; CUDA's attention backward accumulates with atomics
  // (not bitwise reproducible), hence a tolerance rather than 0.
  expect_close(par, plain, bf ? 1e-4 : 1e-6, bf ? 2e-2 : 1e-4, "cuda parallel vs cuda plain");
  // Against the CPU: f32 GEMMs without TF32; bf16 keeps activations in bf16 on CUDA only.
  expect_close(par, cpu, bf ? 1e-2 : 1e-5, bf ? 5e-2 : 1e-3, "cuda parallel vs cpu plain");
  expect_close(plain, cpu, bf ? 1e-2 : 1e-5, bf ? 5e-2 : 1e-3, "cuda plain vs cpu plain");
  expect_trained(par);
}

INSTANTIATE_TEST_SUITE_P(Precisions, ParallelDeviceCuda,
                         ::testing::Values(ops::Precision::f32, ops::Precision::bf16),
                         [](const ::testing::TestParamInfo<ops::Precision>& i) {
                           return std::string(i.param == ops::Precision::bf16 ? "bf16" : "f32");
                         });

// The vocabulary-parallel embedding and cross-entropy on CUDA tensors against the CPU, on a
// one-rank tp group (every id is in its range; the multi-rank split is checked on CPU by the
// integration tests).
TEST(ParallelDeviceCuda, VocabParallelMatchesCpu) {
  if (!cuda_init()) GTEST_SKIP() << "no CUDA device (cuda_init() returned false)";
  const int64_t N = 37, V = 53, D = 16;
  Rng rng(5);
  std::vector<float> hv(size_t(N * D)), wv(size_t(V * D)), gv(size_t(N * D));
  for (auto& x : hv) x = float(rng.normal());
  for (auto& x : gv) x = float(rng.normal());
  for (auto& x : wv) x = float(rng.normal()) * 0.5f;
  std::vector<int32_t> tv(static_cast<size_t>(N)), ids(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) {
    tv[size_t(i)] = i % 7 == 2 ? -1 : int32_t(rng.below(uint64_t(V)));
    ids[size_t(i)] = int32_t(rng.below(uint64_t(V)));
  }
  auto tp = dist::single_rank_communicator("tp");
  for (ops::Precision prec : {ops::Precision::f32, ops::Precision::bf16}) {
    std::vector<Tensor> out[2];
    for (int k = 0; k < 2; ++k) {
      const Device dev = k == 0 ? Device::cpu() : Device::cuda(0);
      Tensor h = Tensor::from_vector(hv, {N, D}, dev), w = Tensor::from_vector(wv, {V, D}, dev);
      h.set_requires_grad(true);
      w.set_requires_grad(true);
      Tensor l =
          text::vocab_parallel_cross_entropy(h, w, Tensor::from_vector(tv, {N}, dev), *tp, 8, prec);
      EXPECT_EQ(l.device(), dev);
      l.backward();
      Tensor we = Tensor::from_vector(wv, {V, D}, dev);
      we.set_requires_grad(true);
      Tensor e = text::vocab_parallel_embedding(we, Tensor::from_vector(ids, {N}, dev), *tp);
      e.backward(Tensor::from_vector(gv, {N, D}, dev));
      out[k] = {l.detach(), h.grad(), w.grad(), e.detach(), we.grad()};
    }
    const double tol = prec == ops::Precision::bf16 ? 1e-2 : 1e-5;
    for (size_t i = 0; i < out[0].size(); ++i)
      EXPECT_LE(max_rel(out[1][i], out[0][i]), tol)
          << "output " << i << (prec == ops::Precision::bf16 ? " bf16" : "");
  }
}
