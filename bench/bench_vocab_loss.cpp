// bench_vocab_loss: the vocabulary-parallel cross-entropy (text/model/vocab_parallel.h) alone,
// forward + backward, on the tp group of all ranks (run it with `mpirun -np 2` for tp 2, or
// alone for a one-rank group): h (rows, dim) random, lm_head (vocab / ranks, dim) per rank,
// every tenth target ignored. Prints the median wall time of a forward and of a forward +
// backward over --reps repetitions after one warm-up (rank 0), and the loss (for checking
// that two builds compute the same thing).
//   bench_vocab_loss [--rows 1024] [--dim 256] [--vocab 32768] [--chunk 256] [--reps 10]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/args.h"
#include "runtime/core/rng.h"
#include "runtime/dist/communicator.h"
#include "text/model/vocab_parallel.h"

using namespace llama3;

namespace {
using bench::arg;
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  try {
    auto world = dist::world_communicator();
    const int64_t N = arg(argc, argv, "--rows", 1024), D = arg(argc, argv, "--dim", 256);
    const int64_t V = arg(argc, argv, "--vocab", 32768), chunk = arg(argc, argv, "--chunk", 256);
    const int reps = int(arg(argc, argv, "--reps", 10));
    LLAMA3_CHECK(V % world->size() == 0, "--vocab {} is not divisible by {} ranks", V,
                 world->size());
    const int64_t Vl = V / world->size();
    Rng rng(1);  // the same h and targets on every rank (h is replicated under tp)
    std::vector<float> hv(size_t(N * D)), wv(size_t(V * D));
    for (auto& x : hv) x = float(rng.normal());
    for (auto& x : wv) x = float(rng.normal()) * 0.05f;
    std::vector<int32_t> tv(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i)
      tv[size_t(i)] = i % 10 == 9 ? -1 : int32_t(rng.below(uint64_t(V)));
    const Tensor h0 = Tensor::from_vector(hv, {N, D}), targets = Tensor::from_vector(tv, {N});
    const Tensor w0 =
        Tensor::from_vector(wv, {V, D}).narrow(0, world->rank() * Vl, Vl).contiguous();
    std::vector<double> fwd, both;
    double loss = 0;
    for (int r = 0; r <= reps; ++r) {
      Tensor h = h0.clone(), w = w0.clone();
      h.set_requires_grad(true);
      w.set_requires_grad(true);
      world->barrier();
      const auto t0 = std::chrono::steady_clock::now();
      Tensor l = text::vocab_parallel_cross_entropy(h, w, targets, *world, chunk);
      loss = l.item();
      const auto t1 = std::chrono::steady_clock::now();
      l.backward();
      const auto t2 = std::chrono::steady_clock::now();
      if (r == 0) continue;  // warm-up
      fwd.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      both.push_back(std::chrono::duration<double, std::milli>(t2 - t0).count());
    }
    if (world->rank() == 0)
      std::printf(
          "vocab_loss ranks %d rows %lld dim %lld vocab %lld chunk %lld: forward %.2f ms, "
          "forward+backward %.2f ms (median of %d), loss %.7f\n",
          world->size(), (long long)N, (long long)D, (long long)V, (long long)chunk, median(fwd),
          median(both), reps, loss);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_vocab_loss: %s\n", e.what());
    dist::abort_all(1);
  }
}
