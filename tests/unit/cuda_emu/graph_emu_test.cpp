// CUDA graph capture on the emulated cuda:0 (host_emu.h records the stream's work during a
// capture and a graph launch runs it): a capture records without running, replays run with
// the arguments of capture time, a synchronising call inside a capture fails it by name, and
// checks deferred by a capture report after the replay. (The Trainer's captured step runs
// here too: tests/unit/backend_parity/cuda_graph_test.cpp, via cuda_graph_emu.cpp.)
#define LLAMA3_CUDA_EMU 1
#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/emu/host_emu.h"
#include "runtime/ops/ops.h"

using namespace llama3;

namespace {

Tensor on_emu(const std::vector<float>& v) {
  return Tensor::from_vector(v, {int64_t(v.size())}, Device::cuda(0));
}

// The deferred checks of the last replay report an error whose text contains `what`.
void expect_deferred_error(Backend& be, const std::string& what) {
  try {
    be.check_deferred();
    ADD_FAILURE() << "check_deferred() did not report \"" << what << "\"";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
}

TEST(GraphEmu, CaptureRecordsAndReplayRunsWithCaptureTimeArguments) {
  ASSERT_TRUE(cuda_init());
  Backend& be = backend_for(Device::cuda(0));
  Tensor x = on_emu({1, 2, 3});
  float alpha = 2.f;
  std::unique_ptr<DeviceGraph> g = be.capture([&] {
    EXPECT_TRUE(be.capturing());
    be.scale(x, alpha);
  });
  EXPECT_FALSE(be.capturing());
  alpha = 10.f;  // a host value changed after capture: the graph keeps 2
  EXPECT_EQ(x.to(Device::cpu()).to_vector<float>(), (std::vector<float>{1, 2, 3}))
      << "capture records, it does not run";
  const uint64_t launches = emu::graph_launches();
  g->replay();
  g->replay();
  EXPECT_EQ(emu::graph_launches(), launches + 2);
  EXPECT_EQ(x.to(Device::cpu()).to_vector<float>(), (std::vector<float>{4, 8, 12}));
}

TEST(GraphEmu, SynchronisingCallInsideACaptureFailsByName) {
  ASSERT_TRUE(cuda_init());
  Backend& be = backend_for(Device::cuda(0));
  Tensor x = on_emu({1, 2, 3});
  try {
    be.capture([&] { (void)be.sum(x); });  // reads the sum back to the host
    ADD_FAILURE() << "a read back inside a capture must fail";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("cudaErrorStreamCaptureUnsupported"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("cudaMemcpyAsync"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(be.capturing());
  EXPECT_EQ(be.sum(x), 6.0) << "the backend works again after a failed capture";
  // An upload (copy_from_host) cannot be captured either.
  EXPECT_THROW(be.capture([&] { (void)on_emu({1}); }), std::exception);
}

TEST(GraphEmu, DeferredChecksSkipTheUpdateAndReportAfterTheReplay) {
  ASSERT_TRUE(cuda_init());
  Backend& be = backend_for(Device::cuda(0));
  Tensor w = on_emu(std::vector<float>(4 * 3, 1.f)).view({4, 3});
  Tensor ids = Tensor::from_vector(std::vector<int32_t>{0, 7}, {2}, Device::cuda(0));
  Tensor out = Tensor::empty({2, 3}, DType::f32, Device::cuda(0));
  Tensor state = Tensor::zeros({AdamWDynamic::size}, DType::f32, Device::cuda(0));
  auto g = be.capture([&] {  // no check yet: the id is checked after the replay
    be.embedding_forward(w, ids, out);
    be.grad_clip_state({w}, Tensor(), 1.f, state);
  });
  g->replay();
  EXPECT_EQ(state.to(Device::cpu()).to_vector<float>()[AdamWDynamic::skip], 1.f)
      << "a step with a bad id must not update";
  expect_deferred_error(be, "outside the vocabulary of 4");  // id 7 of a vocabulary of 4
  EXPECT_NO_THROW(be.check_deferred()) << "reading the checks clears them";
  const std::vector<int32_t> good = {0, 3};
  be.copy_from_host(good.data(), good.size() * sizeof(int32_t), ids);
  g->replay();
  EXPECT_EQ(state.to(Device::cpu()).to_vector<float>()[AdamWDynamic::skip], 0.f);
  EXPECT_NO_THROW(be.check_deferred());
}

}  // namespace

namespace {
// A captured cross-entropy counts its targets on the device at every replay: the mean follows
// the targets uploaded before each replay, and a replay without any target is reported after.
TEST(GraphEmu, CapturedCrossEntropyCountsItsTargetsAtEveryReplay) {
  ASSERT_TRUE(cuda_init());
  Backend& be = backend_for(Device::cuda(0));
  const int64_t N = 6, D = 4, V = 5;
  std::vector<float> hv(N * D), wv(V * D);
  for (size_t i = 0; i < hv.size(); ++i) hv[i] = float(i % 7) * 0.25f - 0.5f;
  for (size_t i = 0; i < wv.size(); ++i) wv[i] = float(i % 5) * 0.3f - 0.6f;
  Tensor h = Tensor::from_vector(hv, {N, D}, Device::cuda(0));
  Tensor w = Tensor::from_vector(wv, {V, D}, Device::cuda(0));
  Tensor tg = Tensor::from_vector(std::vector<int32_t>(N, 1), {N}, Device::cuda(0));
  Tensor loss;
  auto g = be.capture([&] { loss = ops::linear_cross_entropy(h, w, tg); });
  auto eager = [&](const std::vector<int32_t>& t) {
    return ops::linear_cross_entropy(h.to(Device::cpu()), w.to(Device::cpu()),
                                     Tensor::from_vector(t, {N}))
        .item();
  };
  for (const std::vector<int32_t>& t :
       {std::vector<int32_t>{0, 1, 2, 3, 4, 0}, std::vector<int32_t>{-1, 1, -1, 3, -1, -1}}) {
    be.copy_from_host(t.data(), t.size() * sizeof(int32_t), tg);
    g->replay();
    EXPECT_NEAR(loss.item(), eager(t), 1e-6) << "targets " << t[0] << ", " << t[1] << ", ...";
    EXPECT_NO_THROW(be.check_deferred());
  }
  const std::vector<int32_t> none(N, -1);
  be.copy_from_host(none.data(), none.size() * sizeof(int32_t), tg);
  g->replay();
  expect_deferred_error(be, "no target >= 0 among 6 rows");  // a replay without any target
}
}  // namespace

// The per-op profile (bench_cuda_step --profile) names GEMMs by shape and marks the ones that
// add into their output (the weight gradients of later micro-batches) apart from the ones that
// write it, so a profile of gradient accumulation shows what the accumulation costs.
TEST(ProfileEmu, ReportSeparatesAccumulatingGemms) {
  ASSERT_TRUE(cuda_init());
  Backend& be = backend_for(Device::cuda(0));
  Tensor a = on_emu(std::vector<float>(6, 1.f)).view({2, 3});
  Tensor b = on_emu(std::vector<float>(12, 0.5f)).view({3, 4});
  Tensor c = Tensor::empty({2, 4}, DType::f32, Device::cuda(0));
  cuda_profile_start(0);
  be.gemm(a, Trans::N, b, Trans::N, c, 1.f, 0.f);
  be.gemm(a, Trans::N, b, Trans::N, c, 1.f, 1.f);
  be.gemm(a, Trans::N, b, Trans::N, c, 1.f, 1.f);
  const std::string report = cuda_profile_report(0);
  // The calls column of the line whose op is `op` (the name, then spaces, then the time).
  auto calls = [&](const std::string& op) {
    const size_t at = report.find(op + "  ");
    if (at == std::string::npos) return -1;
    std::istringstream line(report.substr(at + op.size(), report.find('\n', at) - at - op.size()));
    double ms = 0;
    int n = -1;
    line >> ms >> n;
    return n;
  };
  EXPECT_EQ(calls("gemm 2x4x3 f32"), 1) << report;
  EXPECT_EQ(calls("gemm 2x4x3 f32 +="), 2) << report;
  EXPECT_EQ(c.to(Device::cpu()).to_vector<float>(), std::vector<float>(8, 4.5f));
}

// `llama3 train --device cuda`'s MFU denominator: the datasheet's dense peaks by card name and
// compute capability, 0 (no MFU shown) for cards not in the table - the emulated device too.
TEST(DevicePeakEmu, DatasheetPeaksByCardAndNoneForOthers) {
  ASSERT_TRUE(cuda_init());
  EXPECT_EQ(nvidia_peak_flops("NVIDIA H100 80GB HBM3", 9, true), 989.4e12);
  EXPECT_EQ(nvidia_peak_flops("NVIDIA H100 80GB HBM3", 9, false), 66.9e12);
  EXPECT_EQ(nvidia_peak_flops("NVIDIA H200", 9, true), 989.4e12);
  EXPECT_EQ(nvidia_peak_flops("NVIDIA GH200 480GB", 9, true), 989.4e12);
  EXPECT_EQ(nvidia_peak_flops("NVIDIA H100 PCIe", 9, true), 756e12);
  EXPECT_EQ(nvidia_peak_flops("NVIDIA H100 NVL", 9, true), 835e12);
  EXPECT_EQ(nvidia_peak_flops("NVIDIA H200 NVL", 9, false), 60e12);
  EXPECT_EQ(nvidia_peak_flops("NVIDIA A100-SXM4-80GB", 8, true), 312e12);
  EXPECT_EQ(nvidia_peak_flops("NVIDIA A100-SXM4-80GB", 8, false), 19.5e12);
  EXPECT_EQ(nvidia_peak_flops("NVIDIA GeForce RTX 4090", 8, true), 0.0);
  EXPECT_EQ(nvidia_peak_flops("NVIDIA H100 80GB HBM3", 8, true), 0.0) << "name and sm must agree";
  EXPECT_EQ(cuda_peak_flops(0, true), 0.0) << "the emulator is no card of the table";
  EXPECT_EQ(cuda_peak_flops(7, true), 0.0) << "no such device";
}
