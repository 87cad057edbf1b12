// Communicator: collectives and point-to-point transfers over one process group, behind one
// interface with three backends - MPI (CPU tensors; also bootstraps NCCL), NCCL (CUDA
// tensors, compiled when CUDA is on) and a single-rank one (no communication). Groups are
// values passed explicitly (ProcessGroups in parallel_dims.h); there is no global group.
//
// Failure model: every blocking wait polls with a deadline (CommOptions::timeout_s). A peer
// that died or hangs makes the wait throw llama3::Error naming the operation, the group and
// the timeout, so ranks exit with a clear message instead of hanging (MPI errors are set to
// MPI_ERRORS_RETURN and turned into exceptions as well).
//
// Byte accounting: each call adds the bytes this rank sends under the standard ring
// algorithms (nccl-tests "bus bytes"): all_reduce 2(n-1)/n * S, all_gather and
// reduce_scatter (n-1)/n * S (S = the full, gathered size), broadcast S on the root,
// send S. bench_parallel compares these counters with the analytic volume of a layout.
//
// Asynchronous collectives (iall_reduce / iall_gather / ireduce_scatter) return a Work whose
// wait() completes them; FSDP uses them to overlap weight gathers and gradient
// reduce-scatters with compute. The base class implements them as the blocking call plus a
// completed handle (the NCCL backend uses that fallback: its stream already orders the
// work); MPI issues MPI_Iallgather / MPI_Ireduce_scatter_block / MPI_Iallreduce. OpenMPI
// progresses a nonblocking collective only inside MPI calls, so callers poll Work::test() at
// convenient points (ParallelLlama: at every block boundary). CommStats::wait_s adds the
// wall time this rank spent blocked in waits (every blocking collective is one) - the
// communication the compute did not hide, plus any time spent waiting for slower peers.
//
// Point-to-point: isend / irecv, and batch_p2p, which issues several transfers as one group
// (NCCL: inside ncclGroupStart/End, as PyTorch's batch_isend_irecv and Megatron do). NCCL
// matches a peer's transfers in issue order (it has no tags) and runs them in order on one
// stream, where a transfer outside a group holds the stream until its peer posts the match;
// the transfers of one group progress together. p2p_in_order() says a communicator has these
// semantics, so that a caller pairs its sends and receives in batches that every peer posts
// in a matching order (the pipeline schedule, text/model/parallelize.cpp). The MPI backend
// emulates them for tests when LLAMA3_P2P_EMULATE_NCCL=1 (CommOptions::emulate_nccl_p2p): a
// transfer outside a batch completes at issue (MPI_Issend / MPI_Irecv waited at once), a batch
// posts all its transfers (sends synchronous-mode) and completes them together before it
// returns, and every transfer uses one tag, so a schedule that could deadlock or mismatch
// under NCCL does so on CPUs too.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/core/tensor.h"

namespace llama3::dist {

enum class ReduceOp : uint8_t { sum, avg, max };

struct CommStats {
  int64_t bytes_sent = 0;  // ring-algorithm bytes this rank sent
  int64_t calls = 0;
  double wait_s = 0;  // wall time blocked in waits (blocking calls and Work::wait)
};

struct CommOptions {
  double timeout_s = 60.0;  // a wait longer than this throws (peer died or hangs)
  // MPI only, for tests: point-to-point with NCCL's ordering (see above). mpi_world() sets it
  // when the environment has LLAMA3_P2P_EMULATE_NCCL=1; split() passes it on.
  bool emulate_nccl_p2p = false;
};

// One transfer of a batch_p2p call: send `tensor` to `peer`, or receive into it from `peer`.
// The tag matches transfers on MPI; NCCL ignores it (matching is by issue order).
struct P2POp {
  enum class Kind : uint8_t { send, recv };
  Kind kind = Kind::send;
  Tensor tensor;  // a handle: a receive writes into its storage
  int peer = 0;
  int tag = 0;
};

// Handle of an asynchronous transfer; wait() blocks (with the deadline) until done and then
// finishes the operation (e.g. the division of an avg). test() progresses it without
// blocking and says whether it is done (its completion still needs wait()).
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
  virtual bool test() { return false; }
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;
  const std::string& name() const { return name_; }  // e.g. "tp", "dp_shard", "world"

  // In place over all ranks (f32, f64 or i32; avg divides after summing).
  virtual void all_reduce(Tensor& t, ReduceOp op = ReduceOp::sum) = 0;
  // out (size * in.numel() elements, contiguous) = concatenation of every rank's in, in rank order.
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // out (in.numel() / size elements) = this rank's slice of the reduction of every rank's in.
  virtual void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op = ReduceOp::sum) = 0;
  virtual void broadcast(Tensor& t, int root) = 0;
  // Asynchronous forms of the three above: the tensors must stay alive and untouched until
  // wait() returns; every rank of the group must issue the same collectives in the same order.
  virtual std::unique_ptr<Work> iall_reduce(Tensor& t, ReduceOp op = ReduceOp::sum);
  virtual std::unique_ptr<Work> iall_gather(const Tensor& in, Tensor& out);
  virtual std::unique_ptr<Work> ireduce_scatter(const Tensor& in, Tensor& out, ReduceOp op = ReduceOp::sum);
  virtual std::unique_ptr<Work> isend(const Tensor& t, int dst, int tag) = 0;
  virtual std::unique_ptr<Work> irecv(Tensor& t, int src, int tag) = 0;
  // The transfers of `ops` issued as one group; one Work per op, in order (the tensors must
  // stay alive until their Work's wait() returns). Default: isend / irecv one after another.
  virtual std::vector<std::unique_ptr<Work>> batch_p2p(std::span<P2POp> ops);
  // True when point-to-point transfers follow NCCL's semantics (see the top of this file):
  // a receive must not be posted ahead of the batch that pairs it with the peer's send.
  virtual bool p2p_in_order() const { return false; }
  virtual void barrier() = 0;
  // Sub-group of the ranks passing the same color, ordered by key (MPI_Comm_split).
  virtual std::shared_ptr<Communicator> split(int color, int key, const std::string& name) = 0;

  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }

 protected:
  void count(int64_t bytes) {
    stats_.bytes_sent += bytes;
    ++stats_.calls;
  }
  void add_wait(double s) { stats_.wait_s += s; }
  std::string name_ = "world";
  CommStats stats_;
};

// The one-rank group: collectives are identities (avg of one value is itself).
std::shared_ptr<Communicator> single_rank_communicator(const std::string& name = "world");

// MPI_COMM_WORLD (initialising MPI on first use; finalised at exit). Throws when the
// library was built without MPI. Under a launcher with one rank it is a 1-rank MPI group.
std::shared_ptr<Communicator> mpi_world(const CommOptions& opt = {});
bool mpi_available();
// The world communicator for this process: MPI when launched by mpirun/srun with more than
// one rank (or MPI is available), else the single-rank one.
std::shared_ptr<Communicator> world_communicator(const CommOptions& opt = {});

// NCCL communicator over the same ranks as `bootstrap` (its unique id broadcast over it),
// for CUDA tensors on `device`. Throws when built without CUDA/NCCL.
// Ends this rank after an error without MPI_Finalize (which would wait for peers stuck in a
// collective); the launcher then terminates the other ranks.
[[noreturn]] void abort_all(int code);
// True between MPI initialisation (by mpi_world) and finalisation.
bool mpi_active();

std::shared_ptr<Communicator> nccl_communicator(Communicator& bootstrap, int device);

// The communicator a model whose parameters are on `device` trains with: `world` itself for
// CPU tensors; for CUDA tensors an NCCL communicator over the same ranks, its unique id
// broadcast over `world` (MPI under a launcher, or the single-rank group in a plain process).
// NCCL waits have no deadline (CommOptions::timeout_s applies to MPI only).
std::shared_ptr<Communicator> communicator_for_device(std::shared_ptr<Communicator> world,
                                                      Device device);
// This rank's GPU among `devices` on its node: the node-local rank set by the launcher
// (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID, SLURM_LOCALID; 0 without one) modulo `devices`.
int local_device_index(int devices);

}  // namespace llama3::dist
