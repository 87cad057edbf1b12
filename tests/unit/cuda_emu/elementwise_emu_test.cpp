// The CUDA element-wise and fused kernels (runtime/cuda/elementwise.cu) on the SIMT
// emulator against the CPU backend (or, for the cross-entropy row kernels, which the CPU
// backend only runs behind its classifier GEMM, a double-precision reference here). Sizes
// leave tails after the vectorised bodies and pointers start misaligned, so both the
// float4 / bf16x8 paths and their scalar remainders run. Every case runs under both emulator
// schedules (emu_util.h).
#define LLAMA3_CUDA_EMU 1
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cuda/kernels.h"
#include "tests/unit/cuda_emu/emu_util.h"

using namespace llama3;
using emu_test::randn;
using emu_test::rel_err;
namespace cu = llama3::cuda;

namespace {

Backend& cpu() {
  return backend_for(Device::cpu());
}
// The CPU reference runs in f32 on the same (bf16-exact) values, as in the GPU parity suite.
Tensor f32(const Tensor& t) {
  return t.to(DType::f32).view({t.numel()}).view(t.shape());
}
cu::KT kt(DType t) {
  return t == DType::bf16 ? cu::KT::bf16 : cu::KT::f32;
}
// A view starting one element in: the launchers' alignment checks then take the scalar path
// for the whole tensor or its head.
Tensor shifted(const Tensor& t) {
  Tensor big = Tensor::empty({t.numel() + 1}, t.dtype());
  Tensor v = big.narrow(0, 1, t.numel());
  v.copy_(t.view({t.numel()}));
  return v;
}

class ElementwiseEmu : public ::testing::TestWithParam<DType> {};

TEST_P(ElementwiseEmu, AddAxpySwiglu) {
  emu_test::each_schedule([&] {
    const DType dt = GetParam();
    for (bool misalign : {false, true}) {
      Tensor a = randn({7, 130}, 1).to(dt), b = randn({7, 130}, 2).to(dt);
      if (misalign) a = shifted(a), b = shifted(b);
      Tensor want = Tensor::empty({a.numel()}, DType::f32), got = Tensor::empty({a.numel()}, dt);
      cpu().add(f32(a).view({a.numel()}), f32(b).view({b.numel()}), want);
      ASSERT_EQ(cu::add(a.data_ptr(), b.data_ptr(), got.data_ptr(), kt(dt), a.numel(), nullptr),
                cudaSuccess);
      EXPECT_LT(rel_err(got, want), dt == DType::bf16 ? 4e-3 : 1e-6) << "add " << misalign;
      Tensor y1 = f32(b).view({b.numel()}), y2 = b.clone().view({b.numel()});
      cpu().axpy(-0.75f, f32(a).view({a.numel()}), y1);
      ASSERT_EQ(cu::axpy(-0.75f, a.data_ptr(), y2.data_ptr(), kt(dt), a.numel(), nullptr),
                cudaSuccess);
      EXPECT_LT(rel_err(y2, y1), dt == DType::bf16 ? 4e-3 : 1e-6) << "axpy " << misalign;

      Tensor g = a.view({a.numel()}), u = b.view({b.numel()});
      Tensor o1 = Tensor::empty({g.numel()}, DType::f32), o2 = Tensor::empty({g.numel()}, dt);
      cpu().swiglu_forward(f32(g), f32(u), o1);
      ASSERT_EQ(
          cu::swiglu_forward(g.data_ptr(), u.data_ptr(), o2.data_ptr(), kt(dt), g.numel(), nullptr),
          cudaSuccess);
      EXPECT_LT(rel_err(o2, o1), dt == DType::bf16 ? 4e-3 : 1e-6) << "swiglu " << misalign;
      Tensor d = randn({g.numel()}, 3).to(dt);
      Tensor dg1 = Tensor::empty({g.numel()}, DType::f32),
             du1 = Tensor::empty({g.numel()}, DType::f32);
      Tensor dg2 = Tensor::empty({g.numel()}, dt), du2 = Tensor::empty({g.numel()}, dt);
      cpu().swiglu_backward(f32(d), f32(g), f32(u), dg1, du1);
      ASSERT_EQ(cu::swiglu_backward(d.data_ptr(), g.data_ptr(), u.data_ptr(), dg2.data_ptr(),
                                    du2.data_ptr(), kt(dt), g.numel(), nullptr),
                cudaSuccess);
      EXPECT_LT(rel_err(dg2, dg1), dt == DType::bf16 ? 4e-3 : 1e-6) << "swiglu dgate " << misalign;
      EXPECT_LT(rel_err(du2, du1), dt == DType::bf16 ? 4e-3 : 1e-6) << "swiglu dup " << misalign;
    }
  });
}

TEST_P(ElementwiseEmu, RmsNormForwardBackward) {
  emu_test::each_schedule([&] {
    const DType dt = GetParam();
    // d = 130: the one-column-a-thread forward; 2048 (f32 x): the float4 forward, two a thread;
    // d = 40 at 1100 rows: two or three rows a backward block (528 blocks), so the prefetch
    // of a block's next row runs; d = 4200: the generic backward (rows beyond registers).
    for (int64_t d : {130, 2048, 40, 4200}) {
      const int64_t n = d == 130 ? 37 : d == 40 ? 1100 : d == 4200 ? 3 : 5;
      Tensor x = randn({n, d}, 4).to(dt), w = randn({d}, 5, 0.5f).to(dt);
      // f32 x may write a bf16 y (the norms that feed bf16 GEMMs).
      for (DType yt : dt == DType::f32 ? std::vector<DType>{DType::f32, DType::bf16}
                                       : std::vector<DType>{DType::bf16}) {
        Tensor y1 = Tensor::empty({n, d}, DType::f32), r1 = Tensor::empty({n}, DType::f32);
        cpu().rmsnorm_forward(f32(x), f32(w), 1e-5f, y1, r1);
        Tensor y2 = Tensor::empty({n, d}, yt), r2 = Tensor::empty({n}, dt);
        ASSERT_EQ(cu::rmsnorm_forward(x.data_ptr(), w.data_ptr(), 1e-5f, y2.data_ptr(),
                                      r2.data_ptr(), kt(dt), n, d, nullptr, kt(yt)),
                  cudaSuccess);
        EXPECT_LT(rel_err(y2, y1), yt == DType::bf16 ? 4e-3 : 1e-6) << "d " << d;
        EXPECT_LT(rel_err(r2, r1), dt == DType::bf16 ? 4e-3 : 1e-6) << "d " << d;
      }
      // Both sides get the same rstd (the emulated kernel's, in dt).
      Tensor rstd = Tensor::empty({n}, dt), y = Tensor::empty({n, d}, dt);
      ASSERT_EQ(cu::rmsnorm_forward(x.data_ptr(), w.data_ptr(), 1e-5f, y.data_ptr(),
                                    rstd.data_ptr(), kt(dt), n, d, nullptr, kt(dt)),
                cudaSuccess);
      Tensor dy = randn({n, d}, 6).to(dt);
      for (bool acc : {false, true}) {
        Tensor dx0 = randn({n, d}, 7).to(dt), dw0 = randn({d}, 8).to(dt);
        // (copies taken first: for f32, f32() shares dx0's and dw0's storage)
        Tensor dx2 = dx0.clone(), dw2 = dw0.clone(), dx3 = dx0.clone(), dw3 = dw0.clone();
        const Tensor dx5 = dx0.clone(), dw5 = dw0.clone();
        Tensor dx1 = f32(dx0), dw1 = f32(dw0);
        cpu().rmsnorm_backward(f32(dy), f32(x), f32(w), f32(rstd), dx1, dw1, acc);
        Tensor part = Tensor::empty({cu::rmsnorm_partial_rows(n), d}, DType::f32);
        ASSERT_EQ(cu::rmsnorm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(),
                                       dx2.data_ptr(), dw2.data_ptr(), part.data<float>(), kt(dt),
                                       n, d, acc, nullptr),
                  cudaSuccess);
        EXPECT_LT(rel_err(dx2, dx1), dt == DType::bf16 ? 1e-2 : 1e-5) << "dx, accumulate " << acc;
        EXPECT_LT(rel_err(dw2, dw1), dt == DType::bf16 ? 1e-2 : 1e-5) << "dw, accumulate " << acc;
        // With the next row prefetched: the same bits.
        ASSERT_EQ(cu::rmsnorm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(),
                                       dx3.data_ptr(), dw3.data_ptr(), part.data<float>(), kt(dt),
                                       n, d, acc, nullptr, /*prefetch=*/true),
                  cudaSuccess);
        EXPECT_EQ(rel_err(dx3, dx2), 0.0) << "prefetch, accumulate " << acc;
        EXPECT_EQ(rel_err(dw3, dw2), 0.0) << "prefetch, accumulate " << acc;
        // f32 with dx's bf16 rounding written too (rmsnorm_backward_bf16): dx and dw keep
        // their bits, and the bf16 copy is the cast of dx, bit for bit (as the cast the o/down
        // projection's backward would otherwise run). d = 4200 takes the generic kernel.
        if (dt == DType::f32) {
          for (bool pf : {false, true}) {
            Tensor dx4 = dx5.clone(), dw4 = dw5.clone();
            Tensor dx16 = Tensor::full({n, d}, 7.0, DType::bf16);
            ASSERT_EQ(
                cu::rmsnorm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(),
                                     dx4.data_ptr(), dw4.data_ptr(), part.data<float>(), kt(dt), n,
                                     d, acc, nullptr, pf, dx16.data_ptr()),
                cudaSuccess);
            EXPECT_EQ(rel_err(dx4, dx2), 0.0) << "bf16 copy, accumulate " << acc;
            EXPECT_EQ(rel_err(dw4, dw2), 0.0) << "bf16 copy, accumulate " << acc;
            EXPECT_EQ(dx16.to_vector<float>(), dx2.to(DType::bf16).to_vector<float>())
                << "d " << d << ", accumulate " << acc << ", prefetch " << pf;
          }
          // dy as 1 or 4 bf16 parts summed by the kernel (Backend::rmsnorm_backward_parts):
          // the bits of the plain backward on their f32 sum added in order.
          for (int np : {1, 4}) {
            std::vector<Tensor> ps;
            cu::RmsDyParts parts;
            std::vector<float> sum(size_t(n * d), 0.f);
            for (int j = 0; j < np; ++j) {
              ps.push_back(randn({n, d}, 60 + j).to(DType::bf16));
              parts.p[j] = ps.back().data_ptr();
              const std::vector<float> v = ps.back().to_vector<float>();
              for (size_t e = 0; e < sum.size(); ++e) sum[e] = j == 0 ? v[e] : sum[e] + v[e];
            }
            parts.n = np;
            const Tensor dys = Tensor::from_vector(sum, {n, d});
            Tensor dxa = dx5.clone(), dwa = dw5.clone(), dxb = dx5.clone(), dwb = dw5.clone();
            Tensor x16a = Tensor::empty({n, d}, DType::bf16), x16b = x16a.clone();
            ASSERT_EQ(
                cu::rmsnorm_backward(dys.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(),
                                     dxa.data_ptr(), dwa.data_ptr(), part.data<float>(), kt(dt), n,
                                     d, acc, nullptr, false, x16a.data_ptr()),
                cudaSuccess);
            ASSERT_EQ(
                cu::rmsnorm_backward(nullptr, x.data_ptr(), w.data_ptr(), rstd.data_ptr(),
                                     dxb.data_ptr(), dwb.data_ptr(), part.data<float>(), kt(dt), n,
                                     d, acc, nullptr, np == 4, x16b.data_ptr(), &parts),
                cudaSuccess);
            EXPECT_EQ(rel_err(dxb, dxa), 0.0) << np << " parts, accumulate " << acc;
            EXPECT_EQ(rel_err(dwb, dwa), 0.0) << np << " parts, accumulate " << acc;
            EXPECT_EQ(x16b.to_vector<float>(), x16a.to_vector<float>()) << np << " parts";
          }
        }
      }
    }
  });
}

TEST_P(ElementwiseEmu, Rope) {
  emu_test::each_schedule([&] {
    const DType dt = GetParam();
    // Head dims 64 and 256 take the per-position kernel (256 at 5 heads: 32 x 4 threads, so
    // a thread rotates two heads), 20 the generic one; the per-position kernel also with 3
    // and 4 positions a block (LLAMA3_ROPE_POSITIONS: 10 positions leave a partial block),
    // with the same bits as one.
    for (const int per : {1, 3, 4})
      for (int64_t dh : {64, 256, 20}) {
        const int64_t B = 2, T = 5, H = dh == 256 ? 5 : 3;
        Tensor x = randn({B, T, H, dh}, 9).to(dt);
        std::vector<float> f(size_t(dh / 2));
        for (int64_t i = 0; i < dh / 2; ++i) f[size_t(i)] = std::pow(10000.f, -2.f * i / dh);
        Tensor inv = Tensor::from_vector(f, {dh / 2});  // f32 whatever x's dtype
        Tensor pos = Tensor::from_vector(std::vector<int32_t>{3, 0, 7, 1, 100}, {T});
        for (bool inverse : {false, true}) {
          Tensor o1 = Tensor::empty(x.shape(), DType::f32), o2 = Tensor::empty(x.shape(), dt);
          cpu().rope(f32(x), inv, pos, inverse, o1);
          ASSERT_EQ(cu::rope(x.data_ptr(), inv.data<float>(), pos.data<int32_t>(), inverse,
                             o2.data_ptr(), kt(dt), B, T, H, dh, nullptr, per),
                    cudaSuccess);
          EXPECT_LT(rel_err(o2, o1), dt == DType::bf16 ? 4e-3 : 1e-6)
              << "dh " << dh << " inverse " << inverse << " per block " << per;
          Tensor o3 = Tensor::empty(x.shape(), dt);
          ASSERT_EQ(cu::rope(x.data_ptr(), inv.data<float>(), pos.data<int32_t>(), inverse,
                             o3.data_ptr(), kt(dt), B, T, H, dh, nullptr, 1),
                    cudaSuccess);
          EXPECT_EQ(o2.to(DType::f32).to_vector<float>(), o3.to(DType::f32).to_vector<float>())
              << "dh " << dh << " inverse " << inverse << " per block " << per;
        }
      }
  });
}

// A bf16 step's RoPE far into the sequence, against the rotation by the exact angles pos *
// inv_freq (f64, from the f32 frequencies, as HF computes them in f32): the angles must be
// f32 products. (With the frequencies rounded to bf16, 2^-9 relative, the angles were radians
// off a few thousand positions in, and the rotated values as far off as the values themselves.)
TEST_P(ElementwiseEmu, RopeAnglesStayExactFarIntoTheSequence) {
  emu_test::each_schedule([&] {
    const DType dt = GetParam();
    const std::vector<int32_t> positions{0, 1, 4095, 8191, 32767, 131071};
    const int64_t B = 1, T = int64_t(positions.size()), H = 2;
    Tensor pos = Tensor::from_vector(positions, {T});
    for (int64_t dh : {64, 20}) {  // the per-position kernel and the generic one
      Tensor x = randn({B, T, H, dh}, 21).to(dt);
      std::vector<float> f(size_t(dh / 2));
      for (int64_t j = 0; j < dh / 2; ++j)
        f[size_t(j)] = float(std::pow(500000.0, -2.0 * double(j) / double(dh)));
      Tensor inv = Tensor::from_vector(f, {dh / 2});
      const std::vector<float> xv = x.to(DType::f32).to_vector<float>();
      for (bool inverse : {false, true}) {
        Tensor o = Tensor::empty(x.shape(), dt);
        ASSERT_EQ(cu::rope(x.data_ptr(), inv.data<float>(), pos.data<int32_t>(), inverse,
                           o.data_ptr(), kt(dt), B, T, H, dh, nullptr, 1),
                  cudaSuccess);
        const std::vector<float> ov = o.to(DType::f32).to_vector<float>();
        const int64_t half = dh / 2;
        double worst = 0, scale = 0;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t j = 0; j < half; ++j) {
              const size_t r = size_t((t * H + h) * dh);
              const double a = double(positions[size_t(t)]) * double(f[size_t(j)]);
              const double c = std::cos(a), sn = inverse ? -std::sin(a) : std::sin(a);
              const double x1 = xv[r + size_t(j)], x2 = xv[r + size_t(j + half)];
              worst = std::max({worst, std::abs(ov[r + size_t(j)] - (x1 * c - x2 * sn)),
                                std::abs(ov[r + size_t(j + half)] - (x2 * c + x1 * sn))});
              scale = std::max({scale, std::abs(x1), std::abs(x2)});
            }
        // f32 angles near 131071 rad are within 2^-7 of the exact ones; bf16 outputs round by
        // 2^-9 of their size.
        EXPECT_LT(worst / scale, dt == DType::bf16 ? 1.5e-2 : 1e-2)
            << "dh " << dh << " inverse " << inverse;
      }
    }
  });
}

TEST_P(ElementwiseEmu, EmbeddingConvertReduce) {
  emu_test::each_schedule([&] {
    const DType dt = GetParam();
    const int64_t V = 11, d = 40;
    Tensor w = randn({V, d}, 10).to(dt);
    Tensor ids = Tensor::from_vector(std::vector<int32_t>{3, 10, 0, 3, 7}, {5});
    Tensor o1 = Tensor::empty({5, d}, DType::f32), o2 = Tensor::empty({5, d}, dt);
    cpu().embedding_forward(f32(w), ids, o1);
    int bad = 0;
    ASSERT_EQ(cu::embedding_forward(w.data_ptr(), ids.data<int32_t>(), o2.data_ptr(), kt(dt), 5, d,
                                    V, &bad, nullptr),
              cudaSuccess);
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(rel_err(o2, o1), 0.0);
    Tensor bad_ids = Tensor::from_vector(std::vector<int32_t>{3, 11}, {2});
    ASSERT_EQ(cu::embedding_forward(w.data_ptr(), bad_ids.data<int32_t>(), o2.data_ptr(), kt(dt), 2,
                                    d, V, &bad, nullptr),
              cudaSuccess);
    EXPECT_EQ(bad, 1) << "id 11 of a vocabulary of 11";
    Tensor dout = randn({5, d}, 11).to(dt);
    Tensor dw2 = randn({V, d}, 12).to(dt), dw1 = f32(dw2);
    cpu().embedding_backward(f32(dout), ids, dw1);
    std::vector<int32_t> scratch(10);
    ASSERT_EQ(cu::embedding_backward(dout.data_ptr(), ids.data<int32_t>(), dw2.data_ptr(), kt(dt),
                                     5, d, V, scratch.data(), nullptr),
              cudaSuccess);
    // f32: the CPU's order of additions, so its bits; bf16: rounded once from them.
    EXPECT_EQ(rel_err(dw2, dt == DType::bf16 ? dw1.to(DType::bf16) : dw1), 0.0);

    // Conversions round to nearest even exactly as the host does, misaligned or not.
    for (bool misalign : {false, true}) {
      Tensor src = randn({1003}, 13, 3.f);
      std::vector<float> raw = src.to_vector<float>();
      for (size_t i = 0; i < raw.size(); ++i)
        raw[i] *= 1.f + 1e-3f * float(i % 7);  // not bf16-exact
      src = Tensor::from_vector(raw, {1003});
      if (misalign) src = shifted(src);
      Tensor want = src.to(DType::bf16), got = Tensor::empty({1003}, DType::bf16);
      ASSERT_EQ(cu::convert_contiguous(src.data_ptr(), cu::KT::f32, got.data_ptr(), cu::KT::bf16,
                                       1003, nullptr),
                cudaSuccess);
      EXPECT_EQ(rel_err(got, want), 0.0) << "f32 -> bf16, misaligned " << misalign;
      Tensor back = Tensor::empty({1003}, DType::f32);
      ASSERT_EQ(cu::convert_contiguous(got.data_ptr(), cu::KT::bf16, back.data_ptr(), cu::KT::f32,
                                       1003, nullptr),
                cudaSuccess);
      EXPECT_EQ(rel_err(back, want.to(DType::f32)), 0.0) << "bf16 -> f32, misaligned " << misalign;
    }

    Tensor x = randn({1003}, 14).to(dt);
    double s = 0, ss = 0;
    for (float f : x.to(DType::f32).to_vector<float>()) s += f, ss += double(f) * f;
    double out = 0;
    std::vector<double> partial(cu::kReduceBlocks);
    unsigned done = 0;
    ASSERT_EQ(
        cu::reduce_sum(x.data_ptr(), kt(dt), 1003, false, &out, partial.data(), &done, nullptr),
        cudaSuccess);
    EXPECT_NEAR(out, s, 1e-9 * std::abs(ss));
    ASSERT_EQ(
        cu::reduce_sum(x.data_ptr(), kt(dt), 1003, true, &out, partial.data(), &done, nullptr),
        cudaSuccess);
    EXPECT_NEAR(out, ss, 1e-9 * ss);
    int nonfinite = 0;
    ASSERT_EQ(cu::any_nonfinite(x.data_ptr(), kt(dt), 1003, &nonfinite, nullptr), cudaSuccess);
    EXPECT_EQ(nonfinite, 0);
    Tensor y = x.to(DType::f32);
    std::vector<float> yv = y.to_vector<float>();
    yv[1001] = NAN;  // in the tail
    y = Tensor::from_vector(yv, {1003}).to(dt);
    ASSERT_EQ(cu::any_nonfinite(y.data_ptr(), kt(dt), 1003, &nonfinite, nullptr), cudaSuccess);
    EXPECT_EQ(nonfinite, 1);
  });
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ElementwiseEmu, ::testing::Values(DType::f32, DType::bf16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// (AdamW's kernels run through the backend in the emulated parity suite: adamw_f32 and
// adamw_f32_tail_and_misaligned, backend_parity_emu.cpp.)

// Cross-entropy rows: losses and d(loss * scale)/dlogits = scale (softmax - onehot), rows
// with target -1 give 0 and no gradient.
// reduce_sum adds its block partials in block order whichever block finishes last: the same
// bits when the blocks run forward or in reverse (atomics would add them in finishing order),
// and its block count is 0 again after each call.
TEST(ElementwiseEmuF32, ReduceSumIsTheSameInAnyBlockOrder) {
  Tensor x = randn({int64_t(1) << 18}, 15);  // all 528 blocks
  double want = 0;
  for (float f : x.to_vector<float>()) want += double(f) * f;
  std::vector<double> partial(cu::kReduceBlocks), got;
  unsigned done = 0;
  emu_test::each_schedule([&] {
    double out = 0;
    ASSERT_EQ(cu::reduce_sum(x.data_ptr(), cu::KT::f32, x.numel(), true, &out, partial.data(),
                             &done, nullptr),
              cudaSuccess);
    EXPECT_EQ(done, 0u);
    got.push_back(out);
  });
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0], got[1]);
  EXPECT_NEAR(got[0], want, 1e-12 * want);
}

// The multi-tensor AdamW: 110 tensors (three launches of at most 48), of sizes with and
// without a whole chunk, tails after the four-wide body, empty ones, views one element off
// alignment, with and without a bf16 copy, in and out of the decay group: the same bits as
// adamw() per tensor, eagerly, in a captured step (dyn: the decay group's decay from dyn),
// and a skipped captured step leaves everything as it was.
TEST(ElementwiseEmuF32, AdamWMultiTensorEqualsPerTensor) {
  const std::vector<int64_t> sizes{0, 1, 3, 2048, cu::kMultiChunk, cu::kMultiChunk + 3, 5, 77};
  struct Param {
    Tensor p, g, m, v, p16;
    bool decays;
  };
  const auto make = [&] {
    std::vector<Param> ps;
    for (int i = 0; i < 110; ++i) {
      const int64_t n = sizes[size_t(i) % sizes.size()] + (i % 3 == 0 ? 4 : 0);
      const bool off = i % 5 == 1;  // 4 bytes off 16-byte alignment: the scalar path
      const auto vec = [&](uint64_t seed, float scale) {
        Tensor t = randn({std::max<int64_t>(n, 1)}, seed, scale).narrow(0, 0, n);
        return off ? shifted(t) : t.contiguous();
      };
      std::vector<float> vv = vec(700 + i, 0.01f).to_vector<float>();
      for (float& x : vv) x = std::abs(x);  // second moments are not negative
      Tensor v = Tensor::from_vector(vv, {n});
      Param q{vec(100 + i, 1.f), vec(300 + i, 1.f), vec(500 + i, 0.1f), off ? shifted(v) : v, {},
              i % 2 == 0};
      if (i % 4 != 3)
        q.p16 = off ? shifted(Tensor::zeros({n}, DType::bf16)) : Tensor::zeros({n}, DType::bf16);
      ps.push_back(std::move(q));
    }
    return ps;
  };
  const auto same = [](const std::vector<Param>& a, const std::vector<Param>& b) {
    for (size_t i = 0; i < a.size(); ++i) {
      SCOPED_TRACE("tensor " + std::to_string(i));
      EXPECT_EQ(a[i].p.to_vector<float>(), b[i].p.to_vector<float>());
      EXPECT_EQ(a[i].m.to_vector<float>(), b[i].m.to_vector<float>());
      EXPECT_EQ(a[i].v.to_vector<float>(), b[i].v.to_vector<float>());
      if (a[i].p16.defined()) {
        EXPECT_EQ(a[i].p16.to(DType::f32).to_vector<float>(),
                  b[i].p16.to(DType::f32).to_vector<float>());
      }
    }
  };
  cu::AdamWScalars a{0.9f, 0.95f, 1e-8f, 0.5f, 1e-2f, 0.3f, 0.f};
  const float decay = 1.f - 1e-2f * 0.1f;
  // dyn (AdamWDynamic): norm, grad_scale, skip, step_size, bc2_sqrt, decay
  const std::vector<float> dyn{0.f, 0.25f, 0.f, 2e-2f, 0.2f, 0.99f};
  std::vector<float> dyn_skip = dyn;
  dyn_skip[2] = 1.f;
  emu_test::each_schedule([&] {
    for (const std::vector<float>* d :
         std::vector<const std::vector<float>*>{nullptr, &dyn, &dyn_skip}) {
      SCOPED_TRACE(!d ? "eager" : d == &dyn ? "captured" : "captured, skipped");
      std::vector<Param> want = make(), got = make(), before = make();
      std::vector<cu::AdamWTensor> ts;
      for (size_t i = 0; i < got.size(); ++i) {
        Param& w = want[i];
        cu::AdamWScalars ai = a;
        ai.decay = d ? 1.f : w.decays ? decay : 1.f;
        ASSERT_EQ(
            cu::adamw(w.p.data<float>(), w.g.data<float>(), w.m.data<float>(), w.v.data<float>(),
                      w.p.numel(), ai, nullptr, w.p16.defined() ? w.p16.data_ptr() : nullptr,
                      d ? d->data() : nullptr, w.decays),
            cudaSuccess);
        Param& q = got[i];
        ts.push_back({q.p.data<float>(), q.g.data<float>(), q.m.data<float>(), q.v.data<float>(),
                      q.p16.defined() ? q.p16.data_ptr() : nullptr, q.p.numel(),
                      d          ? 1.f
                      : q.decays ? decay
                                 : 1.f,
                      q.decays});
      }
      ASSERT_EQ(cu::adamw_multi(ts.data(), int64_t(ts.size()), a, nullptr, d ? d->data() : nullptr),
                cudaSuccess);
      same(got, want);
      if (d == &dyn_skip) {
        same(got, before);
      } else {
        EXPECT_NE(got[1].p.to_vector<float>(), before[1].p.to_vector<float>());
      }
    }
  });
}

// The multi-tensor sum of squares: 100 weighted tensors (two launches of at most 96) of
// several chunks, tails and misaligned views, against a long double sum; the same bits under
// both schedules and the block count reset; no tensors give 0.
TEST(ElementwiseEmuF32, SumSquaresMultiTensor) {
  std::vector<Tensor> xs;
  std::vector<cu::SumSqTensor> ts;
  long double want = 0;
  for (int i = 0; i < 100; ++i) {
    const int64_t n = i == 7 ? 5 * cu::kMultiChunk + 1 : (i * 911) % 3000 + (i % 9 == 0 ? 0 : 1);
    Tensor x = randn({std::max<int64_t>(n, 1)}, 900 + i).narrow(0, 0, n).contiguous();
    if (i % 6 == 5) x = shifted(x);
    const double w = i % 3 == 0 ? 0.5 : i % 3 == 1 ? 1.0 : 2.0;
    for (float f : x.to_vector<float>()) want += (long double)w * f * f;
    ts.push_back({x.data<float>(), n, w});
    xs.push_back(x);
  }
  std::vector<double> partial(cu::kReduceBlocks), got;
  unsigned done = 0;
  emu_test::each_schedule([&] {
    double out = -1;
    ASSERT_EQ(
        cu::sum_squares_multi(ts.data(), int64_t(ts.size()), &out, partial.data(), &done, nullptr),
        cudaSuccess);
    EXPECT_EQ(done, 0u);
    got.push_back(out);
    out = -1;
    ASSERT_EQ(cu::sum_squares_multi(nullptr, 0, &out, partial.data(), &done, nullptr), cudaSuccess);
    EXPECT_EQ(out, 0.0);
  });
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0], got[1]);
  EXPECT_NEAR(got[0], double(want), 1e-12 * double(want));
}

// The embedding backward with runs of repeated ids longer than a rank tile (1024), over
// several rank blocks: the CPU's bits in f32, under both schedules.
TEST(ElementwiseEmuF32, EmbeddingBackwardRepeatedIds) {
  const int64_t n = 2500, V = 7, d = 33;
  std::vector<int32_t> idv(n);
  for (int64_t i = 0; i < n; ++i) idv[size_t(i)] = int32_t((i * 7919) % 5 + (i % 11 == 0 ? 2 : 0));
  Tensor ids = Tensor::from_vector(idv, {n});
  Tensor g = randn({n, d}, 16), w = randn({V, d}, 17);
  Tensor want = w.to(DType::f32).view({V, d});
  want = Tensor::from_vector(want.to_vector<float>(), {V, d});
  cpu().embedding_backward(g, ids, want);
  std::vector<int32_t> scratch(size_t(2 * n));
  emu_test::each_schedule([&] {
    Tensor got = Tensor::from_vector(w.to_vector<float>(), {V, d});
    ASSERT_EQ(cu::embedding_backward(g.data_ptr(), ids.data<int32_t>(), got.data_ptr(), cu::KT::f32,
                                     n, d, V, scratch.data(), nullptr),
              cudaSuccess);
    EXPECT_EQ(got.to_vector<float>(), want.to_vector<float>());
  });
}

// f32 logits with the gradient in place or into a bf16 buffer, and bf16 logits with their
// gradient in place; V = 300 runs the four-wide kernels, V = 301 the scalar ones. The logits
// are bf16-exact, so one float64 reference serves every mode.
TEST(ElementwiseEmuF32, CrossEntropyRows) {
  emu_test::each_schedule([&] {
    for (const int64_t V : {300, 301}) {
      SCOPED_TRACE("V " + std::to_string(V));
      const int64_t nr = 5;
      const std::vector<int32_t> tg{3, -1, 299, 0, 150};
      Tensor targets = Tensor::from_vector(tg, {nr});
      Tensor logits0 = randn({nr, V}, 30, 2.f).to(DType::bf16).to(DType::f32);
      const std::vector<float> lv = logits0.to_vector<float>();
      std::vector<double> loss_ref(nr, 0.0), grad_ref(size_t(nr * V), 0.0);
      const float scale = 0.25f;
      for (int64_t r = 0; r < nr; ++r) {
        if (tg[size_t(r)] < 0) continue;
        double mx = -INFINITY, se = 0;
        for (int64_t j = 0; j < V; ++j) mx = std::max(mx, double(lv[size_t(r * V + j)]));
        for (int64_t j = 0; j < V; ++j) se += std::exp(lv[size_t(r * V + j)] - mx);
        loss_ref[size_t(r)] = mx + std::log(se) - lv[size_t(r * V + tg[size_t(r)])];
        for (int64_t j = 0; j < V; ++j)
          grad_ref[size_t(r * V + j)] = scale * (std::exp(lv[size_t(r * V + j)] - mx) / se -
                                                 (j == tg[size_t(r)] ? 1.0 : 0.0));
      }
      enum Mode { f32_in_place, f32_to_bf16, bf16_in_place };
      for (Mode mode : {f32_in_place, f32_to_bf16, bf16_in_place}) {
        SCOPED_TRACE("mode " + std::to_string(int(mode)));
        Tensor logits = mode == bf16_in_place ? logits0.to(DType::bf16) : logits0.clone();
        Tensor g16 = mode == f32_to_bf16 ? Tensor::empty({nr, V}, DType::bf16) : logits;
        std::vector<float> loss(nr, -1.f);
        int bad = 0;
        ASSERT_EQ(cu::cross_entropy_rows(
                      logits.data_ptr(), mode == bf16_in_place ? cu::KT::bf16 : cu::KT::f32,
                      targets.data<int32_t>(), nr, V, true, scale,
                      mode == f32_in_place ? logits.data<float>() : nullptr,
                      mode == f32_in_place ? nullptr : g16.data_ptr(), loss.data(), &bad, nullptr),
                  cudaSuccess);
        EXPECT_EQ(bad, 0);
        for (int64_t r = 0; r < nr; ++r)
          EXPECT_NEAR(loss[size_t(r)], loss_ref[size_t(r)], 1e-5) << r;
        const std::vector<float> gv = g16.to(DType::f32).to_vector<float>();
        double num = 0, den = 0;
        for (size_t i = 0; i < gv.size(); ++i)
          num += (gv[i] - grad_ref[i]) * (gv[i] - grad_ref[i]), den += grad_ref[i] * grad_ref[i];
        EXPECT_LT(std::sqrt(num / den), mode == f32_in_place ? 1e-5 : 4e-3);
      }
      Tensor over = Tensor::from_vector(std::vector<int32_t>{int32_t(V)}, {1});
      for (bool b16 : {false, true}) {
        Tensor l1 = b16 ? logits0.to(DType::bf16) : logits0.clone();
        float loss1 = 0;
        int bad = 0;
        ASSERT_EQ(cu::cross_entropy_rows(l1.data_ptr(), b16 ? cu::KT::bf16 : cu::KT::f32,
                                         over.data<int32_t>(), 1, V, false, 1.f, nullptr, nullptr,
                                         &loss1, &bad, nullptr),
                  cudaSuccess);
        EXPECT_EQ(bad, 1) << "target V of a vocabulary of V";
      }
      // bf16 logits have a bf16 gradient only.
      Tensor l2 = logits0.to(DType::bf16);
      float loss2[5];
      int bad2 = 0;
      EXPECT_EQ(cu::cross_entropy_rows(l2.data_ptr(), cu::KT::bf16, targets.data<int32_t>(), nr, V,
                                       true, 1.f, reinterpret_cast<float*>(l2.data_ptr()), nullptr,
                                       loss2, &bad2, nullptr),
                cudaErrorInvalidValue);
    }
  });
}

// The vocabulary-parallel statistics on one shard holding columns [v0, v0 + V) against the
// CPU backend's.
TEST(ElementwiseEmuF32, VocabShardKernels) {
  emu_test::each_schedule([&] {
    const int64_t nr = 4, V = 260, v0 = 100;
    Tensor logits = randn({nr, V}, 40, 2.f);
    Tensor targets = Tensor::from_vector(std::vector<int32_t>{150, 7, -1, 359}, {nr});
    Tensor mx1 = Tensor::empty({nr}, DType::f32), mx2 = Tensor::empty({nr}, DType::f32);
    cpu().vocab_shard_max(logits, mx1);
    ASSERT_EQ(cu::vocab_shard_max(logits.data<float>(), nr, V, mx2.data<float>(), nullptr),
              cudaSuccess);
    EXPECT_EQ(rel_err(mx2, mx1), 0.0);
    Tensor se1 = Tensor::empty({nr}, DType::f32), tl1 = Tensor::empty({nr}, DType::f32);
    Tensor se2 = Tensor::empty({nr}, DType::f32), tl2 = Tensor::empty({nr}, DType::f32);
    cpu().vocab_shard_stats(logits, mx1, targets, v0, se1, tl1);
    ASSERT_EQ(
        cu::vocab_shard_stats(logits.data<float>(), mx1.data<float>(), targets.data<int32_t>(), nr,
                              V, v0, se2.data<float>(), tl2.data<float>(), nullptr),
        cudaSuccess);
    EXPECT_LT(rel_err(se2, se1), 1e-6);
    EXPECT_LT(rel_err(tl2, tl1), 1e-6);
    Tensor d1 = logits.clone(), d2 = logits.clone();
    cpu().vocab_shard_dlogits(d1, mx1, se1, targets, v0, 0.5f);
    ASSERT_EQ(cu::vocab_shard_dlogits(d2.data<float>(), mx1.data<float>(), se1.data<float>(),
                                      targets.data<int32_t>(), nr, V, v0, 0.5f, nullptr),
              cudaSuccess);
    EXPECT_LT(rel_err(d2, d1), 1e-6);
    Tensor lo1 = Tensor::empty({nr}, DType::f32), va1 = Tensor::empty({nr}, DType::f32);
    Tensor lo2 = Tensor::empty({nr}, DType::f32), va2 = Tensor::empty({nr}, DType::f32);
    cpu().vocab_row_loss(mx1, se1, tl1, targets, lo1, va1);
    ASSERT_EQ(cu::vocab_row_loss(mx1.data<float>(), se1.data<float>(), tl1.data<float>(),
                                 targets.data<int32_t>(), nr, lo2.data<float>(), va2.data<float>(),
                                 nullptr),
              cudaSuccess);
    EXPECT_LT(rel_err(lo2, lo1), 1e-6);
    EXPECT_EQ(rel_err(va2, va1), 0.0);
  });
}

}  // namespace
