#include "runtime/cuda/emu/simt.h"

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

// Switching fibers. On x86-64 a handful of instructions: push the callee-saved registers,
// MXCSR and the x87 control word on the current stack, save its pointer, load the other
// stack's, pop the same (the System V ABI's whole callee-saved state). ucontext elsewhere,
// whose swapcontext also saves the signal mask: a system call per switch, which made half
// the emulator's time.
#if defined(__x86_64__)
extern "C" void llama3_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl llama3_emu_switch
  .type llama3_emu_switch, @function
llama3_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size llama3_emu_switch, .-llama3_emu_switch
)");
#endif

namespace llama3::emu {

namespace {

// A kernel's locals (register tiles of a few KiB) plus libm and the exception machinery.
constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kGuardBytes = 4096;

enum class State : uint8_t { runnable, at_block, at_warp, done };

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;  // saved stack pointer (llama3_emu_switch)
#else
  ucontext_t ctx;
#endif
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
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
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

void run_body() {
  try {
    (*g.body)();
  } catch (...) {
    if (!g.error) g.error = std::current_exception();
  }
  g.cur->state = State::done;
}

#if defined(__x86_64__)
// A fiber's first frame: it never returns (there is nothing to return to); once the body is
// done it switches to the scheduler for good.
[[noreturn]] void fiber_entry() {
  run_body();
  void* dead = nullptr;
  llama3_emu_switch(&dead, g.sched_sp);
  std::abort();
}
// The stack of a fiber that has not run yet, as llama3_emu_switch leaves one: control word
// and MXCSR, six callee-saved registers, and fiber_entry as the return address, placed so
// that fiber_entry starts with the stack aligned as after a call.
void prepare(Fiber& f) {
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) &
                                          ~uintptr_t(15));
  uint64_t* r = top - 2;  // 16-byte aligned: the return address; r[1]: none (0)
  r[0] = reinterpret_cast<uint64_t>(&fiber_entry);
  r[1] = 0;
  uint64_t* sp = r - 7;
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // r15 r14 r13 r12 rbx rbp
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fcw, 2);
  f.sp = sp;
}
void resume(Fiber& f) {
  llama3_emu_switch(&g.sched_sp, f.sp);
}
void yield_to_scheduler() {
  llama3_emu_switch(&g.cur->sp, g.sched_sp);
}
#else
void trampoline() {
  run_body();  // then uc_link returns to the scheduler
}
void prepare(Fiber& f) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &g.sched;
  makecontext(&f.ctx, trampoline, 0);
}
void resume(Fiber& f) {
  swapcontext(&g.sched, &f.ctx);
}
void yield_to_scheduler() {
  Fiber* f = g.cur;
  swapcontext(&f->ctx, &g.sched);
}
#endif

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
    prepare(f);
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
          resume(f);
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
    // The stack, above one inaccessible guard page: an overflow faults instead of writing
    // into the next fiber's stack.
    char* m = static_cast<char*>(mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (m == MAP_FAILED || mprotect(m, kGuardBytes, PROT_NONE) != 0)
      throw std::runtime_error("emu: cannot map a fiber stack");
    f.stack = m + kGuardBytes;
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

namespace {
// One capture at a time, as the emulated device has one stream per backend and tests capture
// from one thread.
bool g_recording = false;
std::vector<std::function<void()>> g_recorded;
bool g_invalidated = false;  // a synchronising call during the capture
}  // namespace

bool recording() {
  return g_recording;
}
bool& capture_invalidated() {
  return g_invalidated;
}
void begin_recording() {
  if (g_recording) throw std::logic_error("emu: a stream capture is already in progress");
  g_recording = true;
  g_invalidated = false;
  g_recorded.clear();
}
std::vector<std::function<void()>> end_recording() {
  if (!g_recording) throw std::logic_error("emu: end_recording without begin_recording");
  g_recording = false;
  return std::exchange(g_recorded, {});
}
void run_or_record(std::function<void()> work) {
  if (g_recording)
    g_recorded.push_back(std::move(work));
  else
    work();
}

}  // namespace llama3::emu
