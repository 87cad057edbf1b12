#include "runtime/cuda/emu/simt.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama3::emu {

namespace {

// A kernel's locals (register tiles of a few KiB) plus libm and the exception machinery.
constexpr size_t kStackBytes = 256 << 10;

enum class State : uint8_t { runnable, at_block, at_warp, done };

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  Idx3 tid;
  State state = State::runnable;
  int mode = 0;         // at_block: 0 plain, 1 and, 2 or
  int pred = 0;         // __syncthreads_and/or operand, then its result
  unsigned parity = 0;  // which of the warp's two slot buffers the next exchange uses
};

struct Sim {
  std::vector<Fiber> fibers;         // grown on demand, stacks kept between launches
  std::vector<unsigned char> slots;  // per warp: 2 buffers x 32 lanes x kSlotBytes
  std::vector<unsigned char> smem;
  ucontext_t sched;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  Idx3 block;
  Dim3 grid, bdim;
  int nthreads = 0;
  bool active = false;
  Schedule order = Schedule::forward;
};

thread_local Sim g;

void trampoline() {
  try {
    (*g.body)();
  } catch (...) {
    if (!g.error) g.error = std::current_exception();
  }
  g.cur->state = State::done;
  // uc_link returns to the scheduler.
}

void yield_to_scheduler() {
  Fiber* f = g.cur;
  swapcontext(&f->ctx, &g.sched);
}

Fiber& self() {
  if (!g.active || !g.cur) throw std::logic_error("emu: device function called outside run_grid");
  return *g.cur;
}

const char* state_name(State s) {
  switch (s) {
    case State::runnable:
      return "runnable";
    case State::at_block:
      return "__syncthreads";
    case State::at_warp:
      return "a warp collective";
    case State::done:
      return "exited";
  }
  return "?";
}

void run_block(size_t smem_bytes) {
  const int n = g.nthreads;
  const int warps = (n + 31) / 32;
  std::memset(g.smem.data(), 0xFF, smem_bytes);
  for (int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[size_t(i)];
    f.tid = {unsigned(i) % g.bdim.x, (unsigned(i) / g.bdim.x) % g.bdim.y,
             unsigned(i) / (g.bdim.x * g.bdim.y)};
    f.state = State::runnable;
    f.parity = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g.sched;
    makecontext(&f.ctx, trampoline, 0);
  }
  // Warps run one at a time from one block barrier to the next (their warp collectives
  // opening as they go), so a warp reads what another wrote only if a block barrier lies in
  // between: a missing __syncthreads shows as a stale or NaN read. The order of the warps,
  // and of the lanes of a warp between collectives, follows the schedule.
  const bool fwd = g.order == Schedule::forward;
  for (;;) {
    bool progressed = false;
    for (int wi = 0; wi < warps; ++wi) {
      const int w = fwd ? wi : warps - 1 - wi;
      const int lo = 32 * w, hi = std::min(n, 32 * w + 32);
      for (;;) {
        bool ran = false;
        for (int s = lo; s < hi; ++s) {
          Fiber& f = g.fibers[size_t(fwd ? s : lo + hi - 1 - s)];
          if (f.state != State::runnable) continue;
          g.cur = &f;
          swapcontext(&g.sched, &f.ctx);
          g.cur = nullptr;
          ran = true;
          if (g.error) std::rethrow_exception(g.error);
        }
        progressed = progressed || ran;
        int wl = 0, wat = 0;
        for (int i = lo; i < hi; ++i) {
          const State st = g.fibers[size_t(i)].state;
          wl += st != State::done;
          wat += st == State::at_warp;
        }
        if (wl == 0 || wat != wl) break;  // done, or (some lanes) at the block barrier
        for (int i = lo; i < hi; ++i)
          if (g.fibers[size_t(i)].state == State::at_warp)
            g.fibers[size_t(i)].state = State::runnable;
      }
    }
    int live = 0, at_block = 0, all_and = 1, any_or = 0;
    for (int i = 0; i < n; ++i) {
      const Fiber& f = g.fibers[size_t(i)];
      if (f.state == State::done) continue;
      ++live;
      if (f.state == State::at_block) {
        ++at_block;
        all_and &= f.pred != 0;
        any_or |= f.pred != 0;
      }
    }
    if (live == 0) return;
    if (at_block == live) {
      for (int i = 0; i < n; ++i) {
        Fiber& f = g.fibers[size_t(i)];
        if (f.state != State::at_block) continue;
        f.state = State::runnable;
        f.pred = f.mode == 1 ? all_and : f.mode == 2 ? any_or : 0;
      }
      continue;
    }
    if (!progressed) {
      std::string msg = "emu: barrier deadlock in block (" + std::to_string(g.block.x) + "," +
                        std::to_string(g.block.y) + "," + std::to_string(g.block.z) + "):";
      for (int i = 0; i < n; i += 32)
        msg +=
            " thread " + std::to_string(i) + " at " + state_name(g.fibers[size_t(i)].state) + ";";
      throw std::runtime_error(msg);
    }
  }
}

}  // namespace

void run_grid(Dim3 grid, Dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  if (g.active) throw std::logic_error("emu: run_grid inside a kernel");
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n > 1024)
    throw std::invalid_argument("emu: block of " + std::to_string(n) + " threads");
  while (g.fibers.size() < size_t(n)) {
    Fiber f;
    f.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (f.stack == MAP_FAILED) throw std::runtime_error("emu: cannot map a fiber stack");
    g.fibers.push_back(f);
  }
  g.slots.assign(size_t((n + 31) / 32) * 2 * 32 * kSlotBytes, 0);
  if (g.smem.size() < smem_bytes + 16) g.smem.resize(smem_bytes + 16);
  g.body = &body;
  g.grid = grid, g.bdim = block, g.nthreads = n;
  g.error = nullptr;
  g.active = true;
  try {
    const uint64_t nb = uint64_t(grid.x) * grid.y * grid.z;
    for (uint64_t s = 0; s < nb; ++s) {
      const uint64_t i = g.order == Schedule::forward ? s : nb - 1 - s;  // x fastest
      g.block = {unsigned(i % grid.x), unsigned(i / grid.x % grid.y),
                 unsigned(i / (uint64_t(grid.x) * grid.y))};
      run_block(smem_bytes);
    }
  } catch (...) {
    g.active = false, g.cur = nullptr, g.error = nullptr;
    throw;
  }
  g.active = false;
}

void set_schedule(Schedule s) {
  if (g.active) throw std::logic_error("emu: set_schedule inside a kernel");
  g.order = s;
}
Schedule schedule() {
  return g.order;
}

const Idx3& thread_idx() {
  return self().tid;
}
const Idx3& block_idx() {
  return g.block;
}
const Dim3& block_dim() {
  return g.bdim;
}
const Dim3& grid_dim() {
  return g.grid;
}
void* dynamic_smem() {
  // 16-byte aligned, as CUDA's dynamic shared memory is.
  return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(g.smem.data()) + 15) &
                                 ~uintptr_t(15));
}

int sync_block(int mode, int pred) {
  Fiber& f = self();
  f.mode = mode;
  f.pred = pred != 0;
  f.state = State::at_block;
  yield_to_scheduler();
  return f.pred;
}

int lane_id() {
  const Fiber& f = self();
  const unsigned linear = f.tid.x + g.bdim.x * (f.tid.y + g.bdim.y * f.tid.z);
  return int(linear % 32);
}

const unsigned char* warp_exchange(const void* mine, size_t bytes) {
  Fiber& f = self();
  if (bytes > kSlotBytes) throw std::logic_error("emu: warp exchange too large");
  const unsigned linear = f.tid.x + g.bdim.x * (f.tid.y + g.bdim.y * f.tid.z);
  unsigned char* buf = g.slots.data() + ((linear / 32) * 2 + f.parity) * 32 * kSlotBytes;
  std::memcpy(buf + (linear % 32) * kSlotBytes, mine, bytes);
  f.parity ^= 1u;
  f.state = State::at_warp;
  yield_to_scheduler();
  return buf;
}

}  // namespace llama3::emu
