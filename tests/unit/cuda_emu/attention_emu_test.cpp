// The CUDA attention kernels (runtime/cuda/attention*.cu) run on the SIMT emulator against
// the CPU backend's attention, so their tiling, masks, GQA paths and mma.sync/ldmatrix
// fragment layouts are checked on every machine, GPU or not. Same tolerances as the GPU
// parity suite (tests/unit/backend_parity): normalised error below 2e-2 for the tensor-core
// kernels (bf16 products), 1e-5 for the exact f32 kernels, under both emulator schedules
// (blocks and threads forward, then reversed: a race shows as a difference). Shapes are
// small: an emulated warp collective costs about 64 fiber switches.
#define LLAMA3_CUDA_EMU 1
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cuda/emu/simt.h"
#include "runtime/cuda/kernels.h"
#include "tests/unit/cuda_emu/emu_util.h"

using namespace llama3;
namespace cu = llama3::cuda;

namespace {

using emu_test::randn;
using emu_test::rel_err;

struct AttnCase {
  const char* name;
  int64_t B, T, H, Hkv, D;
  bool causal, docs;
  bool tc = true;        // tensor-core kernels (else the exact SIMT ones)
  bool bf16_io = false;  // bf16 q/k/v/dout and outputs (else f32 with bf16 copies)
  bool split = true;     // GQA backward with per-query-head partials
  bool fwd_one_mtile = false;
  bool no_prefetch = false;
  // Queries at explicit key positions (AttentionParams::q_pos) among Tk keys: 1 = the last T
  // positions (KV-cache decoding), 2 = a chunk starting at key Tk / 3 (context parallelism),
  // 3 = half the queries at the start and half at the end (load-balanced context
  // parallelism), 4 = positions in decreasing order (not monotonic).
  int qpos = 0;
  int64_t Tk = 0;     // 0: T
  bool bwd1 = false;  // backward with one key m-tile per warp (AttnShape::bwd_one_mtile)
  bool stsm = false;  // without bwd1: dS by stmatrix (AttnShape::bwd_stmatrix)
  float scale = 0.f;  // softmax scale; 0: 1 / sqrt(D)
  bool part16 = false;  // bf16 GQA partials (AttnShape::gqa_part_bf16; bf16 outputs only)
};

std::ostream& operator<<(std::ostream& os, const AttnCase& c) {
  return os << c.name;
}

class AttentionEmu : public ::testing::TestWithParam<AttnCase> {};

TEST_P(AttentionEmu, MatchesCpuBackend) {
  const AttnCase c = GetParam();
  const int64_t Tk = c.Tk > 0 ? c.Tk : c.T;
  Tensor q = randn({c.B, c.T, c.H, c.D}, 1), k = randn({c.B, Tk, c.Hkv, c.D}, 2);
  Tensor v = randn({c.B, Tk, c.Hkv, c.D}, 3), g = randn({c.B, c.T, c.H, c.D}, 4);
  AttentionParams p;
  p.causal = c.causal;
  p.scale = c.scale;
  Tensor doc;
  if (c.docs) {
    // Boundaries at 23, 63, 150, 300 (row b shifted by 37 b): runs inside a 64-row tile and
    // runs across tiles.
    std::vector<int32_t> d(size_t(c.B * Tk));
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t t = 0; t < Tk; ++t) {
        int32_t id = 0;
        for (int64_t e : {23, 63, 150, 300}) id += (t + 37 * b) >= e;
        d[size_t(b * Tk + t)] = id;
      }
    doc = Tensor::from_vector(d, {c.B, Tk});
    p.doc_ids = doc;
  }
  if (c.qpos) {
    std::vector<int32_t> pos(size_t(c.T));
    for (int64_t i = 0; i < c.T; ++i)
      pos[size_t(i)] = int32_t(c.qpos == 1   ? Tk - c.T + i
                               : c.qpos == 2 ? Tk / 3 + i
                               : c.qpos == 3 ? (i < c.T / 2 ? i : Tk - (c.T - i))
                                             : Tk - 1 - 2 * i);
    p.q_pos = Tensor::from_vector(pos, {c.T});
  }
  Backend& cpu = backend_for(Device::cpu());
  Tensor out = Tensor::empty(q.shape(), DType::f32),
         lse = Tensor::empty({c.B, c.H, c.T}, DType::f32);
  cpu.attention_forward(q, k, v, p, out, lse);
  Tensor dq = Tensor::empty(q.shape(), DType::f32), dk = Tensor::empty(k.shape(), DType::f32);
  Tensor dv = Tensor::empty(v.shape(), DType::f32);
  cpu.attention_backward(g, q, k, v, out, lse, p, dq, dk, dv);

  // The emulated device: host memory, the launchers of kernels.h; both schedules.
  emu_test::each_schedule([&] {
    const float scale = c.scale != 0.f ? c.scale : float(1.0 / std::sqrt(double(c.D)));
    cu::AttnShape a{c.B, c.T, c.H, c.Hkv, c.D, scale, c.causal};
    a.tc = c.tc, a.fwd_one_mtile = c.fwd_one_mtile, a.no_stats_prefetch = c.no_prefetch;
    a.bwd_one_mtile = c.bwd1, a.bwd_stmatrix = c.stsm, a.gqa_part_bf16 = c.part16;
    a.Tk = Tk;
    if (c.qpos) a.q_pos = p.q_pos.data<int32_t>();
    const DType io = c.bf16_io ? DType::bf16 : DType::f32;
    const cu::KT kt = c.bf16_io ? cu::KT::bf16 : cu::KT::f32;
    Tensor qe = q.to(io), ke = k.to(io), ve = v.to(io), ge = g.to(io);
    Tensor q16 = q.to(DType::bf16), k16 = k.to(DType::bf16), v16 = v.to(DType::bf16);
    Tensor g16 = g.to(DType::bf16);
    cu::AttnBf16Inputs in16;
    if (c.tc && !c.bf16_io) in16 = {q16.data_ptr(), k16.data_ptr(), v16.data_ptr(), g16.data_ptr()};
    Tensor ds, de;
    if (c.docs) {
      ds = Tensor::empty({c.B, Tk}, DType::i32), de = Tensor::empty({c.B, Tk}, DType::i32);
      ASSERT_EQ(cu::doc_runs(doc.data<int32_t>(), c.B, Tk, ds.data<int32_t>(), de.data<int32_t>(),
                             nullptr),
                cudaSuccess);
    }
    const int32_t* dsp = c.docs ? ds.data<int32_t>() : nullptr;
    const int32_t* dep = c.docs ? de.data<int32_t>() : nullptr;
    // The tensor-core kernels write an f32 lse always; the SIMT ones the input dtype.
    const DType lse_t = c.tc ? DType::f32 : io;
    Tensor oe = Tensor::empty(q.shape(), io), le = Tensor::empty({c.B, c.H, c.T}, lse_t);
    ASSERT_EQ(cu::attention_forward(qe.data_ptr(), ke.data_ptr(), ve.data_ptr(), dsp, dep,
                                    oe.data_ptr(), le.data_ptr(), kt, a, nullptr, in16),
              cudaSuccess);
    Tensor dqe = Tensor::empty(q.shape(), io), dke = Tensor::empty(k.shape(), io);
    Tensor dve = Tensor::empty(v.shape(), io);
    Tensor dsum = Tensor::empty({c.B, c.H, c.T}, DType::f32);
    Tensor acc = Tensor::empty(q.shape(), DType::f32);
    Tensor part;
    // (bf16 partials with bf16 outputs only: for f32 outputs the launcher keeps f32 ones)
    if (c.tc && c.split && c.H > c.Hkv)
      part =
          Tensor::empty({2, c.B, Tk, c.H, c.D}, c.part16 && c.bf16_io ? DType::bf16 : DType::f32);
    ASSERT_EQ(cu::attention_backward(ge.data_ptr(), qe.data_ptr(), ke.data_ptr(), ve.data_ptr(),
                                     oe.data_ptr(), le.data_ptr(), dsp, dep, dqe.data_ptr(),
                                     dke.data_ptr(), dve.data_ptr(), dsum.data<float>(),
                                     acc.data<float>(), kt, a, nullptr, in16,
                                     part.defined() ? part.data_ptr() : nullptr),
              cudaSuccess);

    const double tol = c.tc || c.bf16_io ? 2e-2 : 1e-5;
    EXPECT_LT(rel_err(oe, out), tol) << "out";
    EXPECT_LT(rel_err(le, lse), c.tc ? 1e-3 : tol) << "lse";
    EXPECT_LT(rel_err(dqe, dq), tol) << "dq";
    EXPECT_LT(rel_err(dke, dk), tol) << "dk";
    EXPECT_LT(rel_err(dve, dv), tol) << "dv";
  });
}

// As the GPU parity suite's tensor-core cases: T not a multiple of the 64-row tiles,
// documents crossing tile boundaries, GQA through both backward layouts, both forward
// m-tile counts, the cp.async (D == 64 / 128) and element-wise (D = 48) tile loads.
INSTANTIATE_TEST_SUITE_P(
    Kernels, AttentionEmu,
    ::testing::Values(
        AttnCase{"tc_causal_doc_gqa_d64_t200", 1, 200, 4, 2, 64, true, true},
        AttnCase{"tc_causal_doc_gqa_d64_t200_kvblocks", 1, 200, 4, 2, 64, true, true, true, false,
                 false},
        AttnCase{"tc_causal_gqa_d64_t150_fwd1_noprefetch", 2, 150, 2, 1, 64, true, false, true,
                 false, true, true, true},
        AttnCase{"tc_causal_doc_d128_t130", 1, 130, 2, 2, 128, true, true},
        // Nine key tiles: whole tiles skipped under the causal mask, documents
        // spanning several tiles, the heaviest-first grid order.
        AttnCase{"tc_causal_doc_gqa_d64_t520", 1, 520, 2, 1, 64, true, true},
        AttnCase{"tc_full_d128_t70", 1, 70, 2, 1, 128, false, false},
        AttnCase{"tc_doc_noncausal_d48_t70", 2, 70, 2, 1, 48, false, true},
        // D % 4 != 0: the one-column-a-thread GQA sum, the per-column dQ atomics.
        AttnCase{"tc_causal_gqa_d30_t70", 1, 70, 4, 2, 30, true, false},
        AttnCase{"tc_bf16_io_causal_gqa_d64_t130", 1, 130, 4, 2, 64, true, false, true, true},
        AttnCase{"simt_causal_doc_gqa_d64_t100", 1, 100, 4, 2, 64, true, true, false},
        AttnCase{"simt_full_d32_t70", 1, 70, 2, 2, 32, false, false, false},
        // Queries at explicit key positions (q_pos), both kernel families.
        AttnCase{"tc_qpos_decode_causal_doc_gqa_d64", 2, 5, 4, 2, 64, true, true, true, false, true,
                 false, false, 1, 170},
        AttnCase{"tc_qpos_cp_chunk_causal_doc_gqa_d64", 1, 70, 4, 2, 64, true, true, true, false,
                 true, false, false, 2, 260},
        AttnCase{"tc_qpos_cp_balanced_causal_d128", 1, 64, 2, 1, 128, true, false, true, false,
                 true, false, false, 3, 200},
        AttnCase{"tc_qpos_reversed_noncausal_doc_d48", 1, 40, 2, 1, 48, false, true, true, false,
                 true, false, false, 4, 90},
        AttnCase{"simt_qpos_decode_causal_doc_gqa_d64", 1, 3, 4, 2, 64, true, true, false, false,
                 true, false, false, 1, 150},
        AttnCase{"simt_qpos_cp_balanced_causal_d32", 1, 50, 2, 2, 32, true, false, false, false,
                 true, false, false, 3, 140},
        // The backward with 64-key blocks and 64-query inner tiles (the default
        // before the H200 run; the layout at head dim 128): documents, GQA
        // partials and per-kv-head blocks, whole-tile (mask-free) pairs at
        // T = 520, both statistics loads, the element-wise tile loads (D = 48),
        // bf16 outputs, queries at explicit positions; then the default with dS
        // by stmatrix.
        AttnCase{"tc_bwd1_causal_doc_gqa_d64_t200", 1, 200, 4, 2, 64, true, true, true, false, true,
                 false, false, 0, 0, true},
        AttnCase{"tc_bwd1_causal_gqa_d64_t520_kvblocks_noprefetch", 1, 520, 2, 1, 64, true, false,
                 true, false, false, false, true, 0, 0, true},
        AttnCase{"tc_bwd1_doc_noncausal_d48_t70", 2, 70, 2, 1, 48, false, true, true, false, true,
                 false, false, 0, 0, true},
        AttnCase{"tc_bwd1_bf16_io_causal_gqa_d64_t130", 1, 130, 4, 2, 64, true, false, true, true,
                 true, false, false, 0, 0, true},
        AttnCase{"tc_bwd1_qpos_cp_chunk_causal_doc_gqa_d64", 1, 70, 4, 2, 64, true, true, true,
                 false, true, false, false, 2, 260, true},
        AttnCase{"tc_stsm_causal_doc_gqa_d64_t200", 1, 200, 4, 2, 64, true, true, true, false, true,
                 false, false, 0, 0, false, true},
        // bf16 GQA partials (LLAMA3_ATTN_GQA_PART_BF16=1, a candidate): bf16
        // outputs with documents (the 128-key tiles and the 64-key ones), D = 30
        // (the one-column-a-thread sum), and f32 outputs, which keep f32 ones.
        AttnCase{"tc_part16_bf16_io_causal_doc_gqa_d64_t200", 1, 200, 4, 2, 64, true, true, true,
                 true, true, false, false, 0, 0, false, false, 0.f, true},
        AttnCase{"tc_part16_bwd1_bf16_io_causal_gqa_d64_t130", 1, 130, 4, 2, 64, true, false, true,
                 true, true, false, false, 0, 0, true, false, 0.f, true},
        AttnCase{"tc_part16_bf16_io_causal_gqa_d30_t70", 1, 70, 4, 2, 30, true, false, true, true,
                 true, false, false, 0, 0, false, false, 0.f, true},
        AttnCase{"tc_part16_f32_io_causal_gqa_d64_t130", 1, 130, 4, 2, 64, true, false, true, false,
                 true, false, false, 0, 0, false, false, 0.f, true},
        // Other scales: the forward takes its row maxima on the raw products and
        // flips Q's signs for a negative scale (both m-tile counts).
        AttnCase{"tc_scale_neg_causal_doc_gqa_d64_t200", 1, 200, 4, 2, 64, true, true, true, false,
                 true, false, false, 0, 0, false, false, -0.3f},
        AttnCase{"tc_scale_neg_causal_d64_t130_fwd1", 1, 130, 2, 1, 64, true, false, true, false,
                 true, true, false, 0, 0, false, false, -0.2f},
        AttnCase{"tc_scale_big_full_d128_t70", 1, 70, 2, 1, 128, false, false, true, false, true,
                 false, false, 0, 0, false, false, 0.5f}),
    [](const auto& info) { return std::string(info.param.name); });

// The emulator itself: a barrier some threads of a block never reach with the others is
// reported, not hung on; an exception in a thread reaches the caller; dynamic shared memory
// starts as NaN so a read before a write shows.
void divergent_kernel(int* out) {
  if (threadIdx.x < 16)
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
  else
    __syncthreads();
}
void throwing_kernel(int n) {
  if (int(threadIdx.x) == n) throw std::runtime_error("thread " + std::to_string(n));
  __syncthreads();
}
void smem_kernel(float* out) {
  LLAMA3_DYNAMIC_SMEM(float, s);
  if (threadIdx.x == 0) s[1] = 2.f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x] + __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 3);
}

// stmatrix stores what ldmatrix loads from the same row addresses (both with and without
// .trans), and .trans stores each matrix column-major: (row r, col c) of matrix i goes to
// element r of stored row c. Rows are 16 bf16 apart; each lane's four words are distinct.
void stmatrix_kernel(uint16_t* mem, uint32_t* back, int trans) {
  const int l = threadIdx.x, i = l / 8, row = l % 8;
  uint16_t* p = mem + (8 * i + row) * 16;
  uint32_t r[4], q[4];
  for (int j = 0; j < 4; ++j)
    r[j] = uint32_t(1000 * j + 2 * l) | (uint32_t(1000 * j + 2 * l + 1) << 16);
  emu::stmatrix_x4(r, p, trans != 0);  // (both are warp collectives: every lane's rows are
  emu::ldmatrix_x4(q, p, trans != 0);  // stored before any lane's load completes)
  for (int j = 0; j < 4; ++j) back[4 * l + j] = q[j] ^ r[j];
}

TEST(Emulator, StmatrixInvertsLdmatrix) {
  for (int trans = 0; trans < 2; ++trans) {
    std::vector<uint16_t> mem(32 * 16, 0xffff);
    std::vector<uint32_t> back(128, 1);
    emu::launch_kernel(stmatrix_kernel, 1, 32, 0, nullptr, mem.data(), back.data(), trans);
    for (int x = 0; x < 128; ++x)
      EXPECT_EQ(back[size_t(x)], 0u) << "trans " << trans << " word " << x;
    // Matrix 2, fragment (row 3, col 5): lane 4 * 3 + 5 / 2 = 14, high half of r[2].
    const uint16_t v = uint16_t(1000 * 2 + 2 * 14 + 1);
    EXPECT_EQ(mem[size_t((8 * 2 + (trans ? 5 : 3)) * 16 + (trans ? 3 : 5))], v)
        << "trans " << trans;
  }
}

TEST(Emulator, ReportsDivergentBarriers) {
  std::vector<int> out(32, -1);
  try {
    emu::launch_kernel(divergent_kernel, 1, 32, 0, nullptr, out.data());
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("deadlock"), std::string::npos) << e.what();
  }
}

TEST(Emulator, RethrowsAndRecovers) {
  EXPECT_THROW(emu::launch_kernel(throwing_kernel, 2, 64, 0, nullptr, 37), std::runtime_error);
  std::vector<float> out(32, 0.f);
  emu::launch_kernel(smem_kernel, 1, 32, 64, nullptr, out.data());
  EXPECT_TRUE(std::isnan(out[0]));        // never written
  EXPECT_EQ(out[1], 2.f + float(1 ^ 3));  // written before the barrier, plus lane 2's id
  EXPECT_TRUE(std::isnan(out[5]));
}

}  // namespace
