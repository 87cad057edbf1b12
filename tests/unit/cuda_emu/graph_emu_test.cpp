// CUDA graph capture on the emulated cuda:0 (host_emu.h records the stream's work during a
// capture and a graph launch runs it): a capture records without running, replays run with
// the arguments of capture time, a synchronising call inside a capture fails it by name, and
// checks deferred by a capture report after the replay. (The Trainer's captured step runs
// here too: tests/unit/backend_parity/cuda_graph_test.cpp, via cuda_graph_emu.cpp.)
#define LLAMA3_CUDA_EMU 1
#include <gtest/gtest.h>

#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/emu/host_emu.h"

using namespace llama3;

namespace {

Tensor on_emu(const std::vector<float>& v) {
  return Tensor::from_vector(v, {int64_t(v.size())}, Device::cuda(0));
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
  try {
    be.check_deferred();
    ADD_FAILURE() << "id 7 of a vocabulary of 4 must be reported";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("outside the vocabulary of 4"), std::string::npos)
        << e.what();
  }
  EXPECT_NO_THROW(be.check_deferred()) << "reading the checks clears them";
  const std::vector<int32_t> good = {0, 3};
  be.copy_from_host(good.data(), good.size() * sizeof(int32_t), ids);
  g->replay();
  EXPECT_EQ(state.to(Device::cpu()).to_vector<float>()[AdamWDynamic::skip], 0.f);
  EXPECT_NO_THROW(be.check_deferred());
}

}  // namespace
