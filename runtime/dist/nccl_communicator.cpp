// NCCL backend: collectives and point-to-point on CUDA tensors, on the backend's current
// stream (waits synchronise it). The unique id travels over an existing (MPI) communicator.
// Compiled when CUDA and NCCL are found; CI machines have no GPU, so it is compile-only
// there (see docs/parallelism.md).
#include "runtime/dist/communicator.h"

#if defined(LLAMA3_WITH_CUDA) && defined(LLAMA3_WITH_NCCL)
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>

#include "runtime/backend/backend.h"

namespace llama3::dist {
namespace {

void nccl_check(ncclResult_t r, const std::string& what) {
  if (r != ncclSuccess) fail("{} failed: {}", what, ncclGetErrorString(r));
}

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::i32: return ncclInt32;
    case DType::bf16: return ncclBfloat16;
    default: fail("nccl: dtype {} unsupported (f32, f64, i32, bf16)", dtype_name(t));
  }
}

int64_t ring_bytes(int n, int64_t full) { return n <= 1 ? 0 : full * (n - 1) / n; }

class NcclWork final : public Work {
 public:
  explicit NcclWork(cudaStream_t s) : s_(s) {}
  void wait() override {
    cudaError_t e = cudaStreamSynchronize(s_);
    if (e != cudaSuccess) fail("nccl wait: {}", cudaGetErrorString(e));
  }

 private:
  cudaStream_t s_;
};

class Nccl final : public Communicator {
 public:
  Nccl(ncclComm_t c, int rank, int size, int device, std::string name)
      : comm_(c), rank_(rank), size_(size), device_(device) {
    name_ = std::move(name);
    cudaSetDevice(device_);
    cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking);
  }
  ~Nccl() override {
    ncclCommDestroy(comm_);
    cudaStreamDestroy(stream_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  void all_reduce(Tensor& t, ReduceOp op) override {
    nccl_check(ncclAllReduce(t.data_ptr(), t.data_ptr(), size_t(t.numel()), nccl_type(t.dtype()), red(op), comm_,
                             stream_),
               "ncclAllReduce");
    sync();
    count(2 * ring_bytes(size_, int64_t(t.nbytes())));
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    nccl_check(ncclAllGather(in.data_ptr(), out.data_ptr(), size_t(in.numel()), nccl_type(in.dtype()), comm_,
                             stream_),
               "ncclAllGather");
    sync();
    count(ring_bytes(size_, int64_t(out.nbytes())));
  }
  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op) override {
    nccl_check(ncclReduceScatter(in.data_ptr(), out.data_ptr(), size_t(out.numel()), nccl_type(in.dtype()),
                                 red(op), comm_, stream_),
               "ncclReduceScatter");
    sync();
    count(ring_bytes(size_, int64_t(in.nbytes())));
  }
  void broadcast(Tensor& t, int root) override {
    nccl_check(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.nbytes(), ncclUint8, root, comm_, stream_),
               "ncclBroadcast");
    sync();
    if (rank_ == root) count(int64_t(t.nbytes()));
  }
  std::unique_ptr<Work> isend(const Tensor& t, int dst, int) override {
    nccl_check(ncclSend(t.data_ptr(), t.nbytes(), ncclUint8, dst, comm_, stream_), "ncclSend");
    count(int64_t(t.nbytes()));
    return std::make_unique<NcclWork>(stream_);
  }
  std::unique_ptr<Work> irecv(Tensor& t, int src, int) override {
    nccl_check(ncclRecv(t.data_ptr(), t.nbytes(), ncclUint8, src, comm_, stream_), "ncclRecv");
    return std::make_unique<NcclWork>(stream_);
  }
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
  void sync() { NcclWork(stream_).wait(); }
  ncclComm_t comm_;
  int rank_, size_, device_;
  cudaStream_t stream_ = nullptr;
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
  fail("nccl_communicator(device {}): this build has no NCCL (needs LLAMA3_CUDA=ON and libnccl)", device);
}
}  // namespace llama3::dist

#endif
