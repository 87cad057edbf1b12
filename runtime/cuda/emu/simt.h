// SIMT emulator: runs CUDA kernels written for runtime/cuda on the CPU, so that their logic
// (tile indexing, masks, fragment layouts, barriers) is tested on machines without a GPU.
// Each thread of a block is a fiber on the calling OS thread; blocks run one after another
// (so `__shared__` variables can be function statics). A fiber runs until it reaches a
// barrier (__syncthreads, or a warp collective: shuffles, ldmatrix, mma.sync) or exits;
// a barrier opens once every live thread of its block (or warp) waits at it. Warp
// collectives exchange their operands through per-warp slots, so mma.sync and ldmatrix
// are computed from the 32 lanes' registers exactly as the PTX ISA lays them out.
//
// What it does not model: timing, memory ordering between blocks (blocks never overlap),
// asynchronous copies (cp.async completes at once) and races (the interleaving is fixed).
// It is a logic check, not a replacement for the GPU tests (bench/RESULTS.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace llama3::emu {

struct Idx3 {
  unsigned x = 0, y = 0, z = 0;
};
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Runs body() once per thread of every block of grid, with block threads, each block given
// smem_bytes of dynamic shared memory (filled with 0xFF bytes - NaN as f32 and bf16 - so a
// read before any write shows). Throws std::runtime_error on a barrier deadlock (threads of a
// block waiting at different barriers) and rethrows an exception thrown by a thread.
void run_grid(Dim3 grid, Dim3 block, size_t smem_bytes, const std::function<void()>& body);

// The order in which blocks, and the threads of a block between two barriers, run. A kernel
// whose result changes with the order has a race: a thread reading shared or global memory
// that another thread writes without a barrier (or a block depending on another block).
// The emulated tests run both orders. Per OS thread; forward by default.
enum class Schedule : uint8_t { forward, reverse };
void set_schedule(Schedule s);
Schedule schedule();

// The calling thread's coordinates (valid inside run_grid's body).
const Idx3& thread_idx();
const Idx3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();
void* dynamic_smem();

// __syncthreads; with mode 1 / 2 also __syncthreads_and / __syncthreads_or of pred
// (returned to every thread); mode 0 returns 0.
int sync_block(int mode = 0, int pred = 0);

// Warp collective: the calling lane contributes `bytes` (<= kSlotBytes) and waits until every
// live lane of its warp has; returns the warp's 32 slots (slot i = lane i's bytes at
// i * kSlotBytes), valid until the lane's next exchange.
constexpr size_t kSlotBytes = 64;
const unsigned char* warp_exchange(const void* mine, size_t bytes);
int lane_id();

// Stream capture (cudaStreamBeginCapture .. cudaStreamEndCapture on the emulated device):
// while recording, stream work (kernel launches, memsets, device copies, GEMMs) is appended
// to the recording instead of run, with its arguments as they were at capture, as CUDA
// graphs capture them; a synchronising call invalidates the capture (host_emu.h), so a
// step that still reads results back on the host fails under capture here as on a GPU.
bool recording();
void begin_recording();
// The recorded work; throws std::logic_error when not recording.
std::vector<std::function<void()>> end_recording();
// Set by a synchronising call during the capture; cleared by begin_recording.
bool& capture_invalidated();
// Runs `work` now, or appends it to the recording.
void run_or_record(std::function<void()> work);

}  // namespace llama3::emu
