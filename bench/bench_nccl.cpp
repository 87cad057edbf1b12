// The NCCL communicator on the GPUs of one machine: checks every collective's result, then
// times all_reduce over message sizes and prints the algorithm bandwidth (bytes / time) and
// the bus bandwidth (nccl-tests' definition: algbw x 2(n-1)/n, the per-link traffic of a
// ring), one line per size and a RESULT line for scripts/gpu-check.sh.
//
// One process, one rank on cuda:0, its NCCL unique id passed through the single-rank
// communicator: the lent GPU machines have one GPU, and NCCL refuses two ranks on one device.
// With n = 1 the bus bandwidth is 0 by definition; what can be measured is the time of NCCL's
// own (local) all_reduce, reported as such. Several GPUs need one process per GPU under
// mpirun with the MPI bootstrap, which this benchmark does not do.
//
//   bench_nccl [--max-mib 256] [--iters 20]
// Exits 77 when there is no CUDA device; 1 when a collective returns a wrong result.
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/core/error.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/dist/communicator.h"

using namespace llama3;

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::vector<float> host(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  backend_for(t.device()).copy_to_host(t, v.data(), v.size() * 4);
  return v;
}

// Every collective on one rank (the identity, up to the operation) must return its input.
int check(dist::Communicator& c, Device dev) {
  Backend& be = backend_for(dev);
  const int64_t n = 1000 * c.size();
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[size_t(i)] = float(i % 97) * 0.5f - 7.f;
  auto make = [&] { return Tensor::from_vector(x, {n}, dev); };
  int bad = 0;
  auto expect = [&](const char* what, const Tensor& t, float mul) {
    be.synchronize();
    std::vector<float> got = host(t);
    for (size_t i = 0; i < got.size(); ++i)
      if (std::abs(got[i] - x[i % x.size()] * mul) > 1e-6f * (1 + std::abs(x[i % x.size()]))) {
        fmt::print("FAIL {}: element {} is {}, expected {}\n", what, i, got[i],
                   x[i % x.size()] * mul);
        ++bad;
        return;
      }
    fmt::print("ok   {} ({} elements)\n", what, got.size());
  };
  const float world = float(c.size());
  Tensor a = make();
  be.synchronize();
  c.all_reduce(a, dist::ReduceOp::sum);
  expect("all_reduce sum", a, world);
  Tensor b = make();
  be.synchronize();
  c.all_reduce(b, dist::ReduceOp::avg);
  expect("all_reduce avg", b, 1.f);
  Tensor m = make();
  be.synchronize();
  c.all_reduce(m, dist::ReduceOp::max);
  expect("all_reduce max", m, 1.f);
  if (c.size() == 1) {  // with one rank gather and scatter are copies of the input
    Tensor in = make(), out = Tensor::zeros({n}, DType::f32, dev);
    be.synchronize();
    c.all_gather(in, out);
    expect("all_gather", out, 1.f);
    Tensor rs = Tensor::zeros({n}, DType::f32, dev);
    c.reduce_scatter(in, rs, dist::ReduceOp::sum);
    expect("reduce_scatter", rs, 1.f);
  }
  Tensor bc = make();
  be.synchronize();
  c.broadcast(bc, 0);
  expect("broadcast", bc, 1.f);
  if (c.size() == 1) {
    // Stream order without host synchronisation, on 16M elements (a scale kernel of about
    // 0.1 ms, so an unordered NCCL copy would read or be overwritten mid-kernel): the NCCL
    // stream waits for the compute stream (in scaled 3x before the gather), Work::wait orders
    // the compute stream after NCCL (out scaled 2x after the wait), and test() turns true.
    const int64_t big = int64_t(1) << 24;
    std::vector<float> y(static_cast<size_t>(big));
    for (int64_t i = 0; i < big; ++i) y[size_t(i)] = x[size_t(i % n)];
    Tensor in = Tensor::from_vector(y, {big}, dev), out = Tensor::zeros({big}, DType::f32, dev);
    be.synchronize();
    be.scale(in, 3.f);
    auto w = c.iall_gather(in, out);
    w->wait();
    be.scale(out, 2.f);
    expect("iall_gather ordered with the compute stream", out, 6.f);
    Tensor rs = Tensor::zeros({big}, DType::f32, dev);
    auto w2 = c.ireduce_scatter(out, rs, dist::ReduceOp::sum);
    w2->wait();
    be.scale(rs, 0.5f);
    expect("ireduce_scatter ordered with the compute stream", rs, 3.f);
    auto w3 = c.iall_reduce(rs, dist::ReduceOp::sum);
    const double t0 = now();
    bool done = false;
    while (!(done = w3->test()) && now() - t0 < 10) {
    }
    w3->wait();
    if (!done) {
      fmt::print("FAIL iall_reduce: test() still false after 10 s\n");
      ++bad;
    }
    expect("iall_reduce with test()", rs, 3.f);
  }
  c.barrier();
  fmt::print("ok   barrier\n");
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    int64_t max_mib = 256, iters = 20;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      LLAMA3_CHECK(i + 1 < argc, "{} needs a value", a);
      if (a == "--max-mib")
        max_mib = std::atoll(argv[++i]);
      else if (a == "--iters")
        iters = std::atoll(argv[++i]);
      else
        fail("unknown argument {} (bench_nccl [--max-mib 256] [--iters 20])", a);
    }
    if (!cuda_init()) {
      fmt::print("SKIP: no CUDA device\n");
      return 77;
    }
    const Device dev = Device::cuda(0);
    auto boot = dist::single_rank_communicator("boot");
    auto comm = dist::nccl_communicator(*boot, dev.index);
    const int n = comm->size();
    fmt::print("nccl communicator: {} rank(s), {} visible GPU(s), {}\n", n, cuda_device_count(),
               backend_for(dev).name());
    if (check(*comm, dev) != 0) return 1;

    Backend& be = backend_for(dev);
    double best_alg = 0;
    int64_t best_bytes = 0;
    fmt::print("{:>12} {:>10} {:>12} {:>12}\n", "bytes", "us", "algbw GB/s", "busbw GB/s");
    for (int64_t bytes = int64_t(1) << 20; bytes <= (max_mib << 20); bytes *= 4) {
      Tensor t = Tensor::full({bytes / 4}, 1.0, DType::f32, dev);
      be.synchronize();
      for (int w = 0; w < 3; ++w) comm->all_reduce(t, dist::ReduceOp::sum);
      const double t0 = now();
      for (int64_t it = 0; it < iters; ++it) comm->all_reduce(t, dist::ReduceOp::sum);
      const double dt = (now() - t0) / double(iters);
      const double alg = double(bytes) / dt / 1e9;
      const double bus = alg * 2.0 * double(n - 1) / double(n);
      fmt::print("{:>12} {:>10.1f} {:>12.1f} {:>12.1f}\n", bytes, dt * 1e6, alg, bus);
      if (alg > best_alg) best_alg = alg, best_bytes = bytes;
    }
    fmt::print("RESULT nccl_allreduce ranks={} algbw_gbs={:.1f} busbw_gbs={:.1f} bytes={}\n", n,
               best_alg, best_alg * 2.0 * double(n - 1) / double(n), best_bytes);
    if (n == 1)
      fmt::print(
          "note: one rank - the bus bandwidth of a ring is 0 by definition; the time is "
          "NCCL's own local all_reduce (per-call overhead plus an in-place pass)\n");
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench_nccl: {}\n", e.what());
    return 1;
  }
}
