// NCCL backend: collectives and point-to-point on CUDA tensors, on the communicator's own
// stream, ordered with the CUDA backend's compute stream by events: every operation first
// waits (on the GPU) for the work already queued on the compute stream, so it reads finished
// inputs, and its Work makes the compute stream wait for it, so later kernels read finished
// outputs. The asynchronous calls return at once (the host never blocks; test() polls the
// event); the blocking ones also synchronise the NCCL stream before returning. The unique id
// travels over an existing (MPI) communicator. Compiled when CUDA and NCCL are found; CI
// machines have no GPU, so it is compile-only there (see docs/parallelism.md).
#include "runtime/dist/communicator.h"

#if defined(LLAMA3_WITH_CUDA) && defined(LLAMA3_WITH_NCCL)
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <span>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cuda/cuda_backend.h"

namespace llama3::dist {
namespace {

void nccl_check(ncclResult_t r, const std::string& what) {
  if (r != ncclSuccess) fail("{} failed: {}", what, ncclGetErrorString(r));
}
void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("nccl communicator: {}: {}", what, cudaGetErrorString(e));
}

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::f32:
      return ncclFloat32;
    case DType::f64:
      return ncclFloat64;
    case DType::i32:
      return ncclInt32;
    case DType::bf16:
      return ncclBfloat16;
    default:
      fail("nccl: dtype {} unsupported (f32, f64, i32, bf16)", dtype_name(t));
  }
}

int64_t ring_bytes(int n, int64_t full) {
  return n <= 1 ? 0 : full * (n - 1) / n;
}

// One operation queued on the NCCL stream: `done` is recorded after it. wait() orders the
// compute stream after it (no host block); test() asks whether it has finished.
class NcclWork final : public Work {
 public:
  NcclWork(cudaEvent_t done, cudaStream_t compute) : done_(done), compute_(compute) {}
  ~NcclWork() override { cudaEventDestroy(done_); }  // (released once it completes)
  void wait() override {
    if (waited_) return;
    cuda_ok(cudaStreamWaitEvent(compute_, done_, 0), "cudaStreamWaitEvent");
    waited_ = true;
  }
  bool test() override {
    const cudaError_t e = cudaEventQuery(done_);
    if (e == cudaErrorNotReady) return false;
    cuda_ok(e, "cudaEventQuery");
    return true;
  }

 private:
  cudaEvent_t done_;
  cudaStream_t compute_;
  bool waited_ = false;
};

class Nccl final : public Communicator {
 public:
  Nccl(ncclComm_t c, int rank, int size, int device, std::string name)
      : comm_(c), rank_(rank), size_(size), device_(device) {
    name_ = std::move(name);
    cuda_ok(cudaSetDevice(device_), "cudaSetDevice");
    cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_ok(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreate");
    LLAMA3_CHECK(cuda_init() && device_ < cuda_device_count(),
                 "nccl communicator: no CUDA backend for device {}", device_);
    compute_ = static_cast<cudaStream_t>(cuda_stream(device_));
  }
  ~Nccl() override {
    ncclCommDestroy(comm_);
    cudaEventDestroy(ready_);
    cudaStreamDestroy(stream_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  void all_reduce(Tensor& t, ReduceOp op) override { finish(iall_reduce(t, op)); }
  void all_gather(const Tensor& in, Tensor& out) override { finish(iall_gather(in, out)); }
  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op) override {
    finish(ireduce_scatter(in, out, op));
  }
  std::unique_ptr<Work> iall_reduce(Tensor& t, ReduceOp op) override {
    after_compute();
    nccl_check(ncclAllReduce(t.data_ptr(), t.data_ptr(), size_t(t.numel()), nccl_type(t.dtype()),
                             red(op), comm_, stream_),
               "ncclAllReduce");
    count(2 * ring_bytes(size_, int64_t(t.nbytes())));
    return queued();
  }
  std::unique_ptr<Work> iall_gather(const Tensor& in, Tensor& out) override {
    after_compute();
    nccl_check(ncclAllGather(in.data_ptr(), out.data_ptr(), size_t(in.numel()),
                             nccl_type(in.dtype()), comm_, stream_),
               "ncclAllGather");
    count(ring_bytes(size_, int64_t(out.nbytes())));
    return queued();
  }
  std::unique_ptr<Work> ireduce_scatter(const Tensor& in, Tensor& out, ReduceOp op) override {
    after_compute();
    nccl_check(ncclReduceScatter(in.data_ptr(), out.data_ptr(), size_t(out.numel()),
                                 nccl_type(in.dtype()), red(op), comm_, stream_),
               "ncclReduceScatter");
    count(ring_bytes(size_, int64_t(in.nbytes())));
    return queued();
  }
  void broadcast(Tensor& t, int root) override {
    after_compute();
    nccl_check(
        ncclBroadcast(t.data_ptr(), t.data_ptr(), t.nbytes(), ncclUint8, root, comm_, stream_),
        "ncclBroadcast");
    if (rank_ == root) count(int64_t(t.nbytes()));
    finish(queued());
  }
  std::unique_ptr<Work> isend(const Tensor& t, int dst, int) override {
    after_compute();
    nccl_check(ncclSend(t.data_ptr(), t.nbytes(), ncclUint8, dst, comm_, stream_), "ncclSend");
    count(int64_t(t.nbytes()));
    return queued();
  }
  std::unique_ptr<Work> irecv(Tensor& t, int src, int) override {
    after_compute();
    nccl_check(ncclRecv(t.data_ptr(), t.nbytes(), ncclUint8, src, comm_, stream_), "ncclRecv");
    return queued();
  }
  // One group: the sends and receives progress together and complete together, so a batch
  // that pairs a stage's send with the receive it needs next cannot wait on a peer that posts
  // the matching receive later on the same stream (see communicator.h).
  std::vector<std::unique_ptr<Work>> batch_p2p(std::span<P2POp> ops) override {
    std::vector<std::unique_ptr<Work>> works;
    if (ops.empty()) return works;
    after_compute();
    nccl_check(ncclGroupStart(), "ncclGroupStart");
    for (P2POp& op : ops) {
      if (op.kind == P2POp::Kind::send) {
        nccl_check(
            ncclSend(op.tensor.data_ptr(), op.tensor.nbytes(), ncclUint8, op.peer, comm_, stream_),
            fmt::format("ncclSend to rank {} on {}", op.peer, name_));
        count(int64_t(op.tensor.nbytes()));
      } else {
        nccl_check(
            ncclRecv(op.tensor.data_ptr(), op.tensor.nbytes(), ncclUint8, op.peer, comm_, stream_),
            fmt::format("ncclRecv from rank {} on {}", op.peer, name_));
      }
    }
    nccl_check(ncclGroupEnd(), "ncclGroupEnd");
    works.reserve(ops.size());
    for (size_t i = 0; i < ops.size(); ++i) works.push_back(queued());
    return works;
  }
  bool p2p_in_order() const override { return true; }
  void barrier() override {
    Tensor one = Tensor::zeros({1}, DType::f32, Device::cuda(device_));
    all_reduce(one, ReduceOp::sum);
  }
  std::shared_ptr<Communicator> split(int color, int key, const std::string& name) override {
    ncclComm_t c;
    nccl_check(ncclCommSplit(comm_, color, key, &c, nullptr), "ncclCommSplit");
    int r = 0, n = 0;
    ncclCommUserRank(c, &r);
    ncclCommCount(c, &n);
    return std::make_shared<Nccl>(c, r, n, device_, name);
  }

 private:
  static ncclRedOp_t red(ReduceOp op) {
    return op == ReduceOp::avg ? ncclAvg : op == ReduceOp::max ? ncclMax : ncclSum;
  }
  // The NCCL stream waits for everything queued on the compute stream so far.
  void after_compute() {
    cuda_ok(cudaEventRecord(ready_, compute_), "cudaEventRecord");
    cuda_ok(cudaStreamWaitEvent(stream_, ready_, 0), "cudaStreamWaitEvent");
  }
  // A Work for the operation just queued on the NCCL stream.
  std::unique_ptr<Work> queued() {
    cudaEvent_t done = nullptr;
    cuda_ok(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
    cuda_ok(cudaEventRecord(done, stream_), "cudaEventRecord");
    return std::make_unique<NcclWork>(done, compute_);
  }
  // Blocking calls: ordered before later compute work, and finished when they return.
  void finish(std::unique_ptr<Work> w) {
    w->wait();
    cuda_ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }
  ncclComm_t comm_;
  int rank_, size_, device_;
  cudaStream_t stream_ = nullptr, compute_ = nullptr;
  cudaEvent_t ready_ = nullptr;
};

}  // namespace

std::shared_ptr<Communicator> nccl_communicator(Communicator& bootstrap, int device) {
  ncclUniqueId id;
  Tensor buf = Tensor::zeros({int64_t(sizeof(id))}, DType::u8);
  if (bootstrap.rank() == 0) {
    nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    std::memcpy(buf.data_ptr(), &id, sizeof(id));
  }
  bootstrap.broadcast(buf, 0);
  std::memcpy(&id, buf.data_ptr(), sizeof(id));
  cudaSetDevice(device);
  ncclComm_t c;
  nccl_check(ncclCommInitRank(&c, bootstrap.size(), id, bootstrap.rank()), "ncclCommInitRank");
  return std::make_shared<Nccl>(c, bootstrap.rank(), bootstrap.size(), device, "world-nccl");
}

}  // namespace llama3::dist

#else

namespace llama3::dist {
std::shared_ptr<Communicator> nccl_communicator(Communicator&, int device) {
  fail("nccl_communicator(device {}): this build has no NCCL (needs LLAMA3_CUDA=ON and libnccl)",
       device);
}
}  // namespace llama3::dist

#endif
