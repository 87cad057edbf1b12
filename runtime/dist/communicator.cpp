#include "runtime/dist/communicator.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>

#include "runtime/backend/backend.h"

#if defined(LLAMA3_WITH_MPI)
// C API only (OpenMPI otherwise pulls in its deprecated C++ bindings).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace llama3::dist {

namespace {

[[maybe_unused]] int64_t ring_bytes(int n, int64_t full_bytes) { return n <= 1 ? 0 : full_bytes * (n - 1) / n; }

// A handle that is complete from the start (single rank; blocking fallbacks).
class DoneWork final : public Work {
 public:
  void wait() override {}
  bool test() override { return true; }
};

class SingleRank final : public Communicator {
 public:
  explicit SingleRank(std::string n) { name_ = std::move(n); }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "single"; }
  void all_reduce(Tensor&, ReduceOp) override {}
  void all_gather(const Tensor& in, Tensor& out) override {
    LLAMA3_CHECK(out.numel() == in.numel(), "all_gather on {}: out has {} elements, in {}", name_, out.numel(),
                 in.numel());
    out.view({in.numel()}).copy_(in.contiguous().view({in.numel()}));
  }
  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp) override {
    LLAMA3_CHECK(out.numel() == in.numel(), "reduce_scatter on {}: out has {} elements, in {}", name_,
                 out.numel(), in.numel());
    out.view({in.numel()}).copy_(in.contiguous().view({in.numel()}));
  }
  void broadcast(Tensor&, int) override {}
  std::unique_ptr<Work> isend(const Tensor&, int dst, int) override {
    fail("isend to rank {} on the single-rank group {}", dst, name_);
  }
  std::unique_ptr<Work> irecv(Tensor&, int src, int) override {
    fail("irecv from rank {} on the single-rank group {}", src, name_);
  }
  void barrier() override {}
  std::shared_ptr<Communicator> split(int, int, const std::string& name) override {
    return std::make_shared<SingleRank>(name);
  }
};

}  // namespace

// Blocking fallbacks (the single-rank and NCCL backends): the work is done on return.
std::unique_ptr<Work> Communicator::iall_reduce(Tensor& t, ReduceOp op) {
  all_reduce(t, op);
  return std::make_unique<DoneWork>();
}
std::unique_ptr<Work> Communicator::iall_gather(const Tensor& in, Tensor& out) {
  all_gather(in, out);
  return std::make_unique<DoneWork>();
}
std::unique_ptr<Work> Communicator::ireduce_scatter(const Tensor& in, Tensor& out, ReduceOp op) {
  reduce_scatter(in, out, op);
  return std::make_unique<DoneWork>();
}

std::vector<std::unique_ptr<Work>> Communicator::batch_p2p(std::span<P2POp> ops) {
  std::vector<std::unique_ptr<Work>> works;
  works.reserve(ops.size());
  for (P2POp& op : ops)
    works.push_back(op.kind == P2POp::Kind::send ? isend(op.tensor, op.peer, op.tag)
                                                 : irecv(op.tensor, op.peer, op.tag));
  return works;
}

std::shared_ptr<Communicator> single_rank_communicator(const std::string& name) {
  return std::make_shared<SingleRank>(name);
}

#if defined(LLAMA3_WITH_MPI)
namespace {

struct MpiRuntime {
  bool owns = false;
  ~MpiRuntime() {
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (owns && init && !fin) MPI_Finalize();
  }
};
MpiRuntime g_mpi_runtime;

void ensure_mpi() {
  int init = 0;
  MPI_Initialized(&init);
  if (init) return;
  int provided = 0;
  MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  g_mpi_runtime.owns = true;
}

std::string mpi_error(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, buf, &len);
  return std::string(buf, size_t(len));
}

MPI_Datatype mpi_type(DType t, const std::string& op) {
  switch (t) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::i32: return MPI_INT;
    default: fail("{}: dtype {} is not reducible (supported: f32, f64, i32)", op, dtype_name(t));
  }
}

// Host-resident contiguous tensors only: MPI reads raw pointers.
void check_host(const Tensor& t, const std::string& op) {
  LLAMA3_CHECK(t.defined() && t.device().is_cpu(), "{}: MPI communicator needs CPU tensors, got {}", op,
               t.defined() ? t.str() : "undefined");
  LLAMA3_CHECK(t.is_contiguous(), "{}: tensor {} must be contiguous", op, t.str());
}

class MpiWork final : public Work {
 public:
  // `wait_acc` (the communicator's CommStats::wait_s) receives the time blocked in wait();
  // `on_done` runs once after completion (e.g. the 1/n of an avg).
  MpiWork(MPI_Request r, std::string what, double timeout, double* wait_acc = nullptr,
          std::function<void()> on_done = {})
      : req_(r), what_(std::move(what)), timeout_(timeout), wait_acc_(wait_acc), on_done_(std::move(on_done)) {}
  // An abandoned request (its wait threw) is leaked on purpose: MPI cannot free an active
  // collective request, and the process is about to end with the error.
  ~MpiWork() override = default;
  bool test() override {
    if (req_ == MPI_REQUEST_NULL) return true;
    int done = 0;
    int rc = MPI_Test(&req_, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) fail("{} failed: {}", what_, mpi_error(rc));
    return done != 0;
  }
  void wait() override {
    if (finished_) return;
    const auto start = std::chrono::steady_clock::now();
    int spins = 0;
    while (!test()) {
      if (++spins > 200) {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (s > timeout_)
          fail("{} did not complete within {:.0f} s: a peer rank died or hangs (CommOptions::timeout_s)",
               what_, timeout_);
      }
    }
    if (wait_acc_) *wait_acc_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    finished_ = true;
    if (on_done_) on_done_();
  }

 private:
  MPI_Request req_;
  std::string what_;
  double timeout_;
  double* wait_acc_;
  std::function<void()> on_done_;
  bool finished_ = false;
};

class Mpi final : public Communicator {
 public:
  Mpi(MPI_Comm c, std::string name, CommOptions opt) : comm_(c), opt_(opt) {
    name_ = std::move(name);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~Mpi() override {
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  void all_reduce(Tensor& t, ReduceOp op) override { iall_reduce(t, op)->wait(); }
  void all_gather(const Tensor& in, Tensor& out) override { iall_gather(in, out)->wait(); }
  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op) override { ireduce_scatter(in, out, op)->wait(); }

  std::unique_ptr<Work> iall_reduce(Tensor& t, ReduceOp op) override {
    check_host(t, what("all_reduce"));
    MPI_Request r;
    check(MPI_Iallreduce(MPI_IN_PLACE, t.data_ptr(), int(t.numel()), mpi_type(t.dtype(), what("all_reduce")),
                         op == ReduceOp::max ? MPI_MAX : MPI_SUM, comm_, &r),
          "all_reduce");
    count(2 * ring_bytes(size_, int64_t(t.nbytes())));
    std::function<void()> done;
    if (op == ReduceOp::avg) done = [t, n = size_]() mutable { backend_for(t.device()).scale(t, 1.f / float(n)); };
    return std::make_unique<MpiWork>(r, what("all_reduce"), opt_.timeout_s, &stats_.wait_s, std::move(done));
  }
  std::unique_ptr<Work> iall_gather(const Tensor& in, Tensor& out) override {
    check_host(in, what("all_gather"));
    check_host(out, what("all_gather"));
    LLAMA3_CHECK(out.numel() == in.numel() * size_ && out.dtype() == in.dtype(),
                 "{}: out {} must hold {} x {}", what("all_gather"), out.str(), size_, in.str());
    MPI_Request r;
    check(MPI_Iallgather(in.data_ptr(), int(in.nbytes()), MPI_BYTE, out.data_ptr(), int(in.nbytes()), MPI_BYTE,
                         comm_, &r),
          "all_gather");
    count(ring_bytes(size_, int64_t(out.nbytes())));
    return std::make_unique<MpiWork>(r, what("all_gather"), opt_.timeout_s, &stats_.wait_s);
  }
  std::unique_ptr<Work> ireduce_scatter(const Tensor& in, Tensor& out, ReduceOp op) override {
    check_host(in, what("reduce_scatter"));
    check_host(out, what("reduce_scatter"));
    LLAMA3_CHECK(in.numel() == out.numel() * size_ && out.dtype() == in.dtype(),
                 "{}: in {} must hold {} x {}", what("reduce_scatter"), in.str(), size_, out.str());
    MPI_Request r;
    check(MPI_Ireduce_scatter_block(in.data_ptr(), out.data_ptr(), int(out.numel()),
                                    mpi_type(in.dtype(), what("reduce_scatter")),
                                    op == ReduceOp::max ? MPI_MAX : MPI_SUM, comm_, &r),
          "reduce_scatter");
    count(ring_bytes(size_, int64_t(in.nbytes())));
    std::function<void()> done;
    if (op == ReduceOp::avg) done = [out, n = size_]() mutable { backend_for(out.device()).scale(out, 1.f / float(n)); };
    return std::make_unique<MpiWork>(r, what("reduce_scatter"), opt_.timeout_s, &stats_.wait_s, std::move(done));
  }
  void broadcast(Tensor& t, int root) override {
    check_host(t, what("broadcast"));
    MPI_Request r;
    check(MPI_Ibcast(t.data_ptr(), int(t.nbytes()), MPI_BYTE, root, comm_, &r), "broadcast");
    MpiWork(r, what("broadcast"), opt_.timeout_s, &stats_.wait_s).wait();
    if (rank_ == root) count(int64_t(t.nbytes()));
  }
  std::unique_ptr<Work> isend(const Tensor& t, int dst, int tag) override {
    std::unique_ptr<Work> w = post_send(t, dst, tag);
    if (!opt_.emulate_nccl_p2p) return w;
    w->wait();  // NCCL: a send outside a group holds the stream until the peer receives it
    return std::make_unique<DoneWork>();
  }
  std::unique_ptr<Work> irecv(Tensor& t, int src, int tag) override {
    std::unique_ptr<Work> w = post_recv(t, src, tag);
    if (!opt_.emulate_nccl_p2p) return w;
    w->wait();
    return std::make_unique<DoneWork>();
  }
  std::vector<std::unique_ptr<Work>> batch_p2p(std::span<P2POp> ops) override {
    std::vector<std::unique_ptr<Work>> works;
    works.reserve(ops.size());
    for (P2POp& op : ops)
      works.push_back(op.kind == P2POp::Kind::send ? post_send(op.tensor, op.peer, op.tag)
                                                   : post_recv(op.tensor, op.peer, op.tag));
    if (!opt_.emulate_nccl_p2p) return works;
    // NCCL: the group's transfers complete together, on a stream that runs nothing else
    // meanwhile; completing them here, before anything later is issued, is that order.
    for (auto& w : works) {
      w->wait();
      w = std::make_unique<DoneWork>();
    }
    return works;
  }
  bool p2p_in_order() const override { return opt_.emulate_nccl_p2p; }
  void barrier() override {
    MPI_Request r;
    check(MPI_Ibarrier(comm_, &r), "barrier");
    MpiWork(r, what("barrier"), opt_.timeout_s, &stats_.wait_s).wait();
  }
  std::shared_ptr<Communicator> split(int color, int key, const std::string& name) override {
    MPI_Comm c;
    check(MPI_Comm_split(comm_, color, key, &c), "split");
    return std::make_shared<Mpi>(c, name, opt_);
  }

 private:
  std::string what(const char* op) const {
    return fmt::format("{} on group '{}' (rank {} of {})", op, name_, rank_, size_);
  }
  void check(int rc, const char* op) const {
    if (rc != MPI_SUCCESS) fail("{} failed: {}", what(op), mpi_error(rc));
  }
  // Posted, not waited. Emulating NCCL: synchronous-mode sends (complete only once matched)
  // and one tag (NCCL matches by issue order only).
  std::unique_ptr<Work> post_send(const Tensor& t, int dst, int tag) {
    check_host(t, what("isend"));
    MPI_Request r;
    if (opt_.emulate_nccl_p2p)
      check(MPI_Issend(t.data_ptr(), int(t.nbytes()), MPI_BYTE, dst, 0, comm_, &r), "issend");
    else
      check(MPI_Isend(t.data_ptr(), int(t.nbytes()), MPI_BYTE, dst, tag, comm_, &r), "isend");
    count(int64_t(t.nbytes()));
    return std::make_unique<MpiWork>(r, fmt::format("{} to rank {}", what("send"), dst),
                                     opt_.timeout_s, &stats_.wait_s);
  }
  std::unique_ptr<Work> post_recv(const Tensor& t, int src, int tag) {
    check_host(t, what("irecv"));
    MPI_Request r;
    check(MPI_Irecv(t.data_ptr(), int(t.nbytes()), MPI_BYTE, src, opt_.emulate_nccl_p2p ? 0 : tag,
                    comm_, &r),
          "irecv");
    return std::make_unique<MpiWork>(r, fmt::format("{} from rank {}", what("recv"), src),
                                     opt_.timeout_s, &stats_.wait_s);
  }
  MPI_Comm comm_;
  CommOptions opt_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

bool mpi_available() { return true; }

std::shared_ptr<Communicator> mpi_world(const CommOptions& opt) {
  ensure_mpi();
  MPI_Comm c;
  MPI_Comm_dup(MPI_COMM_WORLD, &c);
  CommOptions o = opt;
  if (const char* e = std::getenv("LLAMA3_P2P_EMULATE_NCCL"); e && std::string(e) == "1")
    o.emulate_nccl_p2p = true;
  auto world = std::make_shared<Mpi>(c, "world", o);
  if (o.emulate_nccl_p2p && world->rank() == 0)
    spdlog::info(
        "LLAMA3_P2P_EMULATE_NCCL=1: NCCL's point-to-point ordering emulated on MPI (tests)");
  return world;
}

bool mpi_active() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

void abort_all(int code) {
  // Not MPI_Abort: concurrent aborts from several ranks left OpenMPI 4.1's mpirun hanging
  // here. A rank that exits non-zero without MPI_Finalize makes mpirun kill the job.
  std::fflush(nullptr);
  std::_Exit(code);
}

#else

bool mpi_available() { return false; }
std::shared_ptr<Communicator> mpi_world(const CommOptions&) {
  fail("this build has no MPI (configure with LLAMA3_MPI=ON and an MPI installation)");
}
void abort_all(int code) { std::_Exit(code); }
bool mpi_active() { return false; }

#endif

std::shared_ptr<Communicator> world_communicator(const CommOptions& opt) {
  // Launched by mpirun/srun (they set these): MPI; a plain process: one rank, no MPI init.
  const bool launched = std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") ||
                        std::getenv("PMIX_RANK") || std::getenv("SLURM_NTASKS");
  if (launched && mpi_available()) return mpi_world(opt);
  return single_rank_communicator("world");
}

std::shared_ptr<Communicator> communicator_for_device(std::shared_ptr<Communicator> world,
                                                      Device device) {
  if (device.is_cpu()) return world;
  LLAMA3_CHECK(device.type == DeviceType::cuda, "communicator_for_device: no communicator for {}",
               device.str());
  return nccl_communicator(*world, device.index);
}

int local_device_index(int devices) {
  LLAMA3_CHECK(devices > 0, "local_device_index: no devices");
  int local = 0;
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
    if (const char* v = std::getenv(var)) {
      local = std::atoi(v);
      break;
    }
  return local % devices;
}

}  // namespace llama3::dist
