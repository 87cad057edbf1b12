// Every Backend kernel on CUDA against the CPU reference, on random inputs (the idea of
// llama.cpp's test-backend-ops): each case runs once on cpu and once on cuda:0 and compares
// every output by normalised error ||cuda - cpu|| / ||cpu||, which must stay below 1e-5 in
// f32 and 1e-2 in bf16 (2e-2 for attention backward and the tensor-core attention cases) (bf16
// cases feed both backends the same bf16-rounded inputs; the CPU computes in f32 where it has no
// bf16 kernel). Without a CUDA device every case skips.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <list>
#include <random>
#include <string>
#include <vector>

#include "runtime/autograd/autograd.h"
#include "runtime/backend/backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/ops/ops.h"

using namespace llama3;

namespace {

// What a case runs on: the device, the dtype of its floating inputs on that device, and
// the dtype its values are rounded to (bf16 cases round on both devices).
struct Ctx {
  Device dev;
  DType dt;     // storage dtype of floating inputs on this device
  DType round;  // values are rounded to this dtype first
};

std::vector<float> normal(int64_t n, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(g);
  return v;
}

Tensor input(const Ctx& c, const Shape& s, uint64_t seed, float scale = 1.f) {
  std::vector<float> v = normal(shape_numel(s), seed, scale);
  if (c.round == DType::bf16)
    for (auto& x : v) x = bf16_bits_to_f32(f32_to_bf16_bits(x));
  return Tensor::from_vector(v, s, c.dev).to(c.dt);
}
Tensor input_f32(const Ctx& c, const Shape& s, uint64_t seed, float scale = 1.f) {
  return Tensor::from_vector(normal(shape_numel(s), seed, scale), s, c.dev);
}
Tensor ints(const Ctx& c, const std::vector<int32_t>& v, const Shape& s) {
  return Tensor::from_vector(v, s, c.dev);
}
Tensor empty(const Ctx& c, const Shape& s) {
  return Tensor::empty(s, c.dt, c.dev);
}

// f32 rows (rows x d) and weight from seeds seed and seed + 1, normalised on c's device: x,
// w and the forward's rstd, for the backward cases.
struct NormRows {
  Tensor x, w, rstd;
};
NormRows norm_rows(const Ctx& c, int64_t rows, int64_t d, uint64_t seed) {
  NormRows r{input_f32(c, {rows, d}, seed), input_f32(c, {d}, seed + 1),
             Tensor::empty({rows}, DType::f32, c.dev)};
  Tensor y = Tensor::empty({rows, d}, DType::f32, c.dev);
  backend_for(c.dev).rmsnorm_forward(r.x, r.w, 1e-5f, y, r.rstd);
  return r;
}

// Attention forward, then backward with a random output gradient (seed): out, lse, dq, dk, dv.
std::vector<Tensor> attention_fwd_bwd(const Ctx& c, const Tensor& q, const Tensor& k,
                                      const Tensor& v, const AttentionParams& p, uint64_t seed) {
  Backend& be = backend_for(c.dev);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  Tensor out = empty(c, {B, T, H, D}), lse = empty(c, {B, H, T});
  be.attention_forward(q, k, v, p, out, lse);
  Tensor g = input(c, {B, T, H, D}, seed);
  Tensor dq = empty(c, q.shape()), dk = empty(c, k.shape()), dv = empty(c, v.shape());
  be.attention_backward(g, q, k, v, out, lse, p, dq, dk, dv);
  return {out, lse, dq, dk, dv};
}
Tensor scalar(const Ctx& c, double v) {
  return Tensor::full({1}, v, DType::f32, Device::cpu());
}
// One of the CUDA backend's environment switches (its A/B choices, read on every call) set
// for a scope, and unset again on leaving it, also when the case throws; a null value leaves
// the environment alone.
class ScopedEnv {
 public:
  ScopedEnv(std::string name, const char* value) : name_(value ? std::move(name) : "") {
    if (!name_.empty()) setenv(name_.c_str(), value, 1);
  }
  ~ScopedEnv() {
    if (!name_.empty()) unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;  // empty: nothing set
};

struct Case {
  std::string name;
  DType dtype = DType::f32;
  bool cpu_has_dtype = false;  // CPU runs bf16 itself (gemm, cross-entropy, bf16 model step)
  double tol = 0;              // 0: the default for the dtype
  std::function<std::vector<Tensor>(const Ctx&)> run;
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << c.name;
}

// ---------------------------------------------------------------- cases
std::vector<Case> make_cases() {
  std::vector<Case> cs;
  auto both = [&](const std::string& name, bool cpu_bf16,
                  std::function<std::vector<Tensor>(const Ctx&)> f, double tol32 = 0,
                  double tol16 = 0) {
    cs.push_back({name + "_f32", DType::f32, true, tol32, f});
    cs.push_back({name + "_bf16", DType::bf16, cpu_bf16, tol16, f});
  };

  // ---- memory
  both("copy_transpose_convert", true, [](const Ctx& c) {
    Tensor x = input(c, {5, 7, 3}, 1);
    Tensor t = x.transpose(0, 2);  // strided view
    Tensor y = Tensor::empty(t.shape(), DType::f32, c.dev);
    y.copy_(t);
    Tensor z = Tensor::zeros({7, 9}, DType::f32, c.dev);
    Tensor zn = z.narrow(1, 2, 5);
    zn.copy_(x.narrow(2, 1, 1).contiguous().view({5, 7}).transpose(0, 1));
    return std::vector<Tensor>{y, z};
  });
  // f32 <-> bf16 casts: the vectorised kernels (16-byte aligned, 4 elements a thread) with a
  // scalar tail (1027 elements), and the scalar kernels (a view 1 element in: misaligned).
  both("cast_f32_bf16_vector_and_tail", true, [](const Ctx& c) {
    Tensor x = input(c, {1027}, 3).to(DType::f32);
    Tensor whole = x.to(DType::bf16).to(DType::f32);
    Tensor part = x.narrow(0, 1, 1021).to(DType::bf16).to(DType::f32);
    return std::vector<Tensor>{whole, part};
  });
  cs.push_back({"fill_and_int_copy", DType::f32, true, 0, [](const Ctx& c) {
                  Tensor a = Tensor::full({3, 5}, 2.5, DType::bf16, c.dev);
                  Tensor b = Tensor::full({7}, -3, DType::i32, c.dev).to(DType::f32);
                  Tensor d = Tensor::zeros({4, 6}, DType::f32, c.dev);
                  Tensor dn = d.narrow(1, 1, 3);
                  dn.fill_(1.25);
                  return std::vector<Tensor>{a, b, d};
                }});

  // ---- GEMM (all transpose combinations, row strides, alpha/beta, batched)
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T}) {
      std::string nm =
          std::string("gemm_") + (ta == Trans::N ? "n" : "t") + (tb == Trans::N ? "n" : "t");
      both(nm, true, [ta, tb](const Ctx& c) {
        const int64_t m = 37, n = 29, k = 45;
        Tensor a = ta == Trans::N ? input(c, {m, k + 3}, 2).narrow(1, 1, k)
                                  : input(c, {k, m + 5}, 2).narrow(1, 0, m);
        Tensor b = tb == Trans::N ? input(c, {k, n}, 3) : input(c, {n, k + 2}, 3).narrow(1, 2, k);
        Tensor out = input_f32(c, {m, n + 4}, 4);
        Tensor cc = out.narrow(1, 0, n);
        backend_for(c.dev).gemm(a, ta, b, tb, cc, 0.75f, 0.5f);
        return std::vector<Tensor>{out};
      });
    }
  both("gemm_batched", true, [](const Ctx& c) {
    Tensor a = input(c, {3, 17, 24}, 5), b = input(c, {3, 19, 24}, 6);
    Tensor out = Tensor::empty({3, 17, 19}, DType::f32, c.dev);
    backend_for(c.dev).gemm(a, Trans::N, b, Trans::T, out, 1.f, 0.f);
    return std::vector<Tensor>{out};
  });
  // d = a b^T + c with c read by the GEMM (the residual add of linear_residual): contiguous,
  // then c and d as row-strided views one element in (misaligned: the classic-API path, c
  // copied into d first), and k = 0 (d = c).
  both("gemm_add", true, [](const Ctx& c) {
    Backend& be = backend_for(c.dev);
    Tensor a = input(c, {33, 40}, 60), b = input(c, {24, 40}, 61);
    Tensor r = input_f32(c, {33, 24}, 62), d = Tensor::empty({33, 24}, DType::f32, c.dev);
    be.gemm_add(a, Trans::N, b, Trans::T, r, d);
    Tensor rw = input_f32(c, {33, 26}, 63), dw = input_f32(c, {33, 26}, 64);
    Tensor rv = rw.narrow(1, 1, 24), dv = dw.narrow(1, 1, 24);
    be.gemm_add(a, Trans::N, b, Trans::T, rv, dv);
    Tensor e = Tensor::empty({5, 24}, DType::f32, c.dev);
    be.gemm_add(input(c, {5, 0}, 65), Trans::N, input(c, {24, 0}, 66), Trans::T, r.narrow(0, 0, 5),
                e);
    return std::vector<Tensor>{d, dw, e};
  });
  // GEMMs with LLAMA3_GEMM_AUTOTUNE=1 (a candidate): the first call of each shape times
  // cuBLASLt's candidates on its own operands and must still leave one GEMM's result: written
  // (beta 0), accumulated in place (beta 0.5: the trials read a copy of c), with a separate c
  // (gemm_add), batched. Shapes no other case uses, so their plans are made (and tuned) here.
  both("gemm_autotune", true, [](const Ctx& c) {
    Backend& be = backend_for(c.dev);
    const ScopedEnv env("LLAMA3_GEMM_AUTOTUNE", "1");
    Tensor a = input(c, {41, 52}, 160), b = input(c, {33, 52}, 161);
    Tensor w = Tensor::empty({41, 33}, DType::f32, c.dev);
    be.gemm(a, Trans::N, b, Trans::T, w, 1.f, 0.f);
    Tensor a2 = input(c, {43, 52}, 162), acc = input_f32(c, {43, 33}, 163);
    be.gemm(a2, Trans::N, b, Trans::T, acc, 0.75f, 0.5f);
    Tensor a3 = input(c, {45, 52}, 164), r = input_f32(c, {45, 33}, 165);
    Tensor d = Tensor::empty({45, 33}, DType::f32, c.dev);
    be.gemm_add(a3, Trans::N, b, Trans::T, r, d);
    Tensor ab = input(c, {3, 18, 26}, 166), bb = input(c, {3, 21, 26}, 167);
    Tensor o = Tensor::empty({3, 18, 21}, DType::f32, c.dev);
    be.gemm(ab, Trans::N, bb, Trans::T, o, 1.f, 0.f);
    return std::vector<Tensor>{w, acc, d, o};
  });
  both("gemm_large_k", true, [](const Ctx& c) {
    Tensor a = input(c, {64, 1000}, 7), b = input(c, {1000, 96}, 8);
    Tensor out = Tensor::empty({64, 96}, DType::f32, c.dev);
    backend_for(c.dev).gemm(a, Trans::N, b, Trans::N, out, 1.f, 0.f);
    return std::vector<Tensor>{out};
  });

  // ---- element-wise and reductions (f32 compute on both; bf16 storage on cuda)
  both("add_axpy_scale", false, [](const Ctx& c) {
    Backend& be = backend_for(c.dev);
    Tensor a = input(c, {1001}, 10), b = input(c, {1001}, 11), o = empty(c, {1001});
    be.add(a, b, o);
    Tensor y = input(c, {1001}, 12);
    be.axpy(-0.5f, a, y);
    be.scale(b, 3.f);
    // The device-scalar forms (the scale read when the kernel runs; scale_by skips 1).
    Tensor s = Tensor::full({1}, -1.25, DType::f32, c.dev),
           one = Tensor::full({1}, 1.0, DType::f32, c.dev);
    Tensor y2 = input(c, {1003}, 17), x2 = input(c, {1003}, 18), z = input(c, {1003}, 19);
    be.axpy_by(s, x2, y2);
    be.scale_by(x2, s);
    be.scale_by(z, one);
    return std::vector<Tensor>{o, y, b, y2, x2, z};
  });
  both("reductions", false, [](const Ctx& c) {
    Backend& be = backend_for(c.dev);
    Tensor a = input(c, {100003}, 13);
    Tensor bad = input(c, {517}, 14);
    Tensor nanv = Tensor::full({1}, NAN, c.dt, c.dev);
    bad.narrow(0, 300, 1).copy_(nanv);
    // The multi-tensor form of the gradient norm: weighted, and non-finite with a NaN in
    // any tensor.
    Tensor b = input(c, {7, 130}, 15), e = input(c, {1}, 16);
    const double many = be.sum_squares_many({a, b, e}, {1.0, 0.5, 2.0});
    const double many_bad = be.sum_squares_many({a, bad}, {});
    return std::vector<Tensor>{scalar(c, be.sum(a)),
                               scalar(c, be.sum_squares(a)),
                               scalar(c, be.all_finite(a) ? 1 : 0),
                               scalar(c, be.all_finite(bad) ? 1 : 0),
                               scalar(c, many),
                               scalar(c, std::isfinite(many_bad) ? 1 : 0),
                               scalar(c, be.sum_squares_many({}, {}))};
  });

  // ---- fused kernels
  both("embedding", false, [](const Ctx& c) {
    Backend& be = backend_for(c.dev);
    Tensor w = input(c, {50, 33}, 20);
    Tensor ids = ints(c, {3, 7, 3, 49, 0, 7, 7, 12, 3}, {9});
    Tensor out = empty(c, {9, 33});
    be.embedding_forward(w, ids, out);
    Tensor g = input(c, {9, 33}, 21);
    Tensor dw = input(c, {50, 33}, 22);  // accumulated into (+=)
    be.embedding_backward(g, ids, dw);
    return std::vector<Tensor>{out, dw};
  });
  both("rmsnorm", false, [](const Ctx& c) {
    Backend& be = backend_for(c.dev);
    Tensor x = input(c, {13, 300}, 30), w = input(c, {300}, 31);
    Tensor y = empty(c, {13, 300}), rstd = empty(c, {13});
    be.rmsnorm_forward(x, w, 1e-5f, y, rstd);
    Tensor dy = input(c, {13, 300}, 32), dx = empty(c, {13, 300});
    Tensor dw = input(c, {300}, 33);  // accumulated into (+=)
    be.rmsnorm_backward(dy, x, w, rstd, dx, dw, false);
    // dx added to (the in-place sum of the residual stream's gradient)
    Tensor dx2 = input(c, {13, 300}, 38);
    be.rmsnorm_backward(dy, x, w, rstd, dx2, dw, true);
    return std::vector<Tensor>{y, rstd, dx, dw, dx2};
  });
  // Wider rows: more rows than the 528 partial rows (several rows per block) at d = 2100
  // (16 columns a thread in registers), and d = 4100 (the kernel without register rows). The
  // forward's float4 kernel: 1 (d = 300), 4 (2100) and 8 (4100) float4 a thread.
  // _prefetch: the register kernel loading a block's next row before this row's reduction
  // (LLAMA3_RMSNORM_BWD_PREFETCH=1, a candidate).
  for (auto [d, prefetch] :
       {std::pair{int64_t(2100), false}, {int64_t(4100), false}, {int64_t(2100), true}}) {
    const int64_t rows = d == 2100 ? 600 : 5;
    both("rmsnorm_d" + std::to_string(d) + (prefetch ? "_prefetch" : ""), false,
         [d, rows, prefetch](const Ctx& c) {
           Backend& be = backend_for(c.dev);
           Tensor x = input(c, {rows, d}, 34), w = input(c, {d}, 35);
           Tensor y = empty(c, {rows, d}), rstd = empty(c, {rows});
           be.rmsnorm_forward(x, w, 1e-5f, y, rstd);
           Tensor dy = input(c, {rows, d}, 36), dx = empty(c, {rows, d});
           Tensor dw = input(c, {d}, 37);
           const ScopedEnv env("LLAMA3_RMSNORM_BWD_PREFETCH", prefetch ? "1" : nullptr);
           be.rmsnorm_backward(dy, x, w, rstd, dx, dw, false);
           Tensor dx2 = input(c, {rows, d}, 39);
           be.rmsnorm_backward(dy, x, w, rstd, dx2, dw, true);
           return std::vector<Tensor>{y, rstd, dx, dw, dx2};
         });
  }
  // f32 x with a bf16 output (the model's norms where the backend prefers bf16 activations).
  cs.push_back({"rmsnorm_f32_to_bf16", DType::f32, true, 1e-2, [](const Ctx& c) {
                  Backend& be = backend_for(c.dev);
                  Tensor x = input_f32(c, {13, 300}, 30), w = input_f32(c, {300}, 31);
                  Tensor y = Tensor::empty({13, 300}, DType::bf16, c.dev);
                  Tensor rstd = Tensor::empty({13}, DType::f32, c.dev);
                  be.rmsnorm_forward(x, w, 1e-5f, y, rstd);
                  return std::vector<Tensor>{y.to(DType::f32), rstd};
                }});
  // The backward of f32 rows also writing dx's bf16 rounding (the residual gradient the
  // o/down projections' bf16 GEMMs read; the CPU's default casts after), written and added to,
  // at d = 300 (register rows) and 4100 (the generic kernel).
  for (int64_t d : {300, 4100}) {
    cs.push_back(
        {"rmsnorm_backward_bf16_d" + std::to_string(d), DType::f32, true, 1e-2, [d](const Ctx& c) {
           Backend& be = backend_for(c.dev);
           const int64_t rows = d == 300 ? 13 : 5;
           const auto [x, w, rstd] = norm_rows(c, rows, d, 30);
           Tensor dy = input_f32(c, {rows, d}, 32), dw = input_f32(c, {d}, 33);
           Tensor dx = Tensor::empty({rows, d}, DType::f32, c.dev);
           Tensor dx16 = Tensor::empty({rows, d}, DType::bf16, c.dev);
           be.rmsnorm_backward_bf16(dy, x, w, rstd, dx, dw, false, dx16);
           Tensor dx2 = input_f32(c, {rows, d}, 38);
           Tensor dx2_16 = Tensor::empty({rows, d}, DType::bf16, c.dev);
           be.rmsnorm_backward_bf16(dy, x, w, rstd, dx2, dw, true, dx2_16);
           // The copies are the casts of the f32 results, bit for bit.
           LLAMA3_CHECK(dx16.to(DType::f32).to_vector<float>() ==
                                dx.to(DType::bf16).to(DType::f32).to_vector<float>() &&
                            dx2_16.to(DType::f32).to_vector<float>() ==
                                dx2.to(DType::bf16).to(DType::f32).to_vector<float>(),
                        "rmsnorm_backward_bf16: a bf16 copy differs from the cast of dx");
           return std::vector<Tensor>{dx, dw, dx2, dx16.to(DType::f32), dx2_16.to(DType::f32)};
         }});
  }
  // The backward of f32 rows with dy given as bf16 parts summed in f32 (the q/k/v or gate/up
  // projections' gradients, Backend::rmsnorm_backward_parts): 2 parts written, 4 added to with
  // the bf16 copy of dx, at d = 300 and 4100.
  for (int64_t d : {300, 4100}) {
    cs.push_back(
        {"rmsnorm_backward_parts_d" + std::to_string(d), DType::f32, true, 1e-5, [d](const Ctx& c) {
           Backend& be = backend_for(c.dev);
           const int64_t rows = d == 300 ? 13 : 5;
           const auto [x, w, rstd] = norm_rows(c, rows, d, 40);
           std::vector<Tensor> parts;
           for (int j = 0; j < 4; ++j)
             parts.push_back(input_f32(c, {rows, d}, 42 + j).to(DType::bf16));
           Tensor dw = input_f32(c, {d}, 46);
           Tensor dx = Tensor::empty({rows, d}, DType::f32, c.dev);
           be.rmsnorm_backward_parts({parts[0], parts[1]}, x, w, rstd, dx, dw, false, nullptr);
           Tensor dx2 = input_f32(c, {rows, d}, 47);
           Tensor dx2_16 = Tensor::empty({rows, d}, DType::bf16, c.dev);
           be.rmsnorm_backward_parts(parts, x, w, rstd, dx2, dw, true, &dx2_16);
           return std::vector<Tensor>{dx, dw, dx2, dx2_16.to(DType::f32)};
         }});
  }
  // Head dims 16 and 64 (the CUDA per-position kernel, four pairs a thread; 64 at positions up to
  // 4000, as in a 4096-token step) and 12 (half 6: the one-pair-a-thread kernel).
  // "_pos4": CUDA's per-position kernel at 4 positions a block (LLAMA3_ROPE_POSITIONS=4, a
  // candidate; 22 positions leave a partial block).
  for (int64_t dh : {16, 12, 64, -64}) {
    const bool pos4 = dh < 0;
    dh = std::abs(dh);
    const std::string nm = dh == 16 ? std::string("rope") : "rope_d" + std::to_string(dh);
    both(pos4 ? nm + "_pos4" : nm, false, [dh, pos4](const Ctx& c) {
      Backend& be = backend_for(c.dev);
      const ScopedEnv env("LLAMA3_ROPE_POSITIONS", pos4 ? "4" : nullptr);
      std::vector<float> f(dh / 2);
      for (int64_t j = 0; j < dh / 2; ++j) f[j] = float(std::pow(500000.0, -2.0 * j / dh));
      // (f32 frequencies whatever x's dtype, f64 with f64 x: Backend::rope)
      Tensor inv =
          Tensor::from_vector(f, {dh / 2}, c.dev).to(c.dt == DType::f64 ? DType::f64 : DType::f32);
      std::vector<int32_t> p(11);
      for (int i = 0; i < 11; ++i) p[i] = dh == 64 ? 4000 - 397 * i : 5 + 3 * i;
      Tensor pos = ints(c, p, {11});
      Tensor x = input(c, {2, 11, 3, dh}, 40), y = empty(c, {2, 11, 3, dh}),
             z = empty(c, {2, 11, 3, dh});
      be.rope(x, inv, pos, false, y);
      be.rope(y, inv, pos, true, z);
      return std::vector<Tensor>{y, z};
    });
  }
  both("swiglu", false, [](const Ctx& c) {
    Backend& be = backend_for(c.dev);
    Tensor g = input(c, {7, 130}, 50, 2.f), u = input(c, {7, 130}, 51), o = empty(c, {7, 130});
    be.swiglu_forward(g, u, o);
    Tensor d = input(c, {7, 130}, 52), dg = empty(c, {7, 130}), du = empty(c, {7, 130});
    be.swiglu_backward(d, g, u, dg, du);
    return std::vector<Tensor>{o, dg, du};
  });

  // ---- attention: causal + document mask, GQA, head dims 32/48/64/128
  struct AttnCfg {
    const char* name;
    int64_t B, T, H, Hkv, D;
    bool causal, docs;
  };
  for (AttnCfg a : {AttnCfg{"attn_causal_doc_gqa_d32", 2, 77, 4, 2, 32, true, true},
                    AttnCfg{"attn_full_d64", 1, 130, 2, 2, 64, false, false},
                    AttnCfg{"attn_causal_gqa4_d128", 1, 100, 8, 2, 128, true, false},
                    AttnCfg{"attn_doc_noncausal_d48", 2, 70, 3, 1, 48, false, true}}) {
    // lse is stored in the input dtype (ops contract), so bf16 backward gets 2e-2.
    both(
        a.name, false,
        [a](const Ctx& c) {
          Tensor q = input(c, {a.B, a.T, a.H, a.D}, 60), k = input(c, {a.B, a.T, a.Hkv, a.D}, 61);
          Tensor v = input(c, {a.B, a.T, a.Hkv, a.D}, 62);
          AttentionParams p;
          p.causal = a.causal;
          if (a.docs) {
            std::vector<int32_t> d(size_t(a.B * a.T));
            for (int64_t b = 0; b < a.B; ++b)
              for (int64_t t = 0; t < a.T; ++t)  // documents of lengths 23, 40, rest; row 1 shifted
                d[b * a.T + t] = int32_t((t + 11 * b) < 23 ? 0 : (t + 11 * b) < 63 ? 1 : 2);
            p.doc_ids = ints(c, d, {a.B, a.T});
          }
          return attention_fwd_bwd(c, q, k, v, p, 63);
        },
        0, 2e-2);
  }

  // ---- tensor-core attention (AttentionParams::compute = bf16): f32 inputs and outputs on
  // both devices, the CPU computes exactly (it ignores `compute`), CUDA multiplies in bf16
  // with f32 accumulation, so a bf16 tolerance. T not a multiple of the 64-row tiles, T =
  // 1024 (many tiles, causal skipping), documents crossing tile boundaries, GQA, D 64 / 128
  // and odd head dims (zero padded).
  struct TcCfg {
    const char* name;
    int64_t B, T, H, Hkv, D;
    bool causal, docs;
    const char* env = nullptr;  // a kernel choice of the CUDA backend switched for this case
  };
  // (By default GQA cases run the backward with one block per query head and f32 dK/dV
  // partials summed over the group, and head dim <= 64 runs the forward with two m16 tiles
  // of query rows per warp (128 per block; 64 at head dim 128). _kvblocks keeps one backward
  // block per kv head, _fwd1 one forward m-tile per warp, _noprefetch the plain lse/dsum
  // loads; head dim <= 64 runs the backward on 128-key blocks with 32-query inner tiles:
  // _bwd1 runs it on 64-key blocks with 64-query tiles (the default before the H200 run),
  // _stsm stores dS by stmatrix.)
  for (TcCfg a : {TcCfg{"attn_tc_causal_doc_gqa_d64_t200", 2, 200, 4, 2, 64, true, true},
                  TcCfg{"attn_tc_causal_doc_gqa4_d64_t200_kvblocks", 1, 200, 8, 2, 64, true, true,
                        "LLAMA3_ATTN_GQA_SPLIT=0"},
                  TcCfg{"attn_tc_causal_doc_gqa_d64_t200_fwd1", 2, 200, 4, 2, 64, true, true,
                        "LLAMA3_ATTN_FWD_MT=1"},
                  TcCfg{"attn_tc_causal_gqa_d64_t333_noprefetch", 1, 333, 4, 2, 64, true, false,
                        "LLAMA3_ATTN_STATS_PREFETCH=0"},
                  TcCfg{"attn_tc_causal_doc_gqa_d64_t200_bwd1", 2, 200, 4, 2, 64, true, true,
                        "LLAMA3_ATTN_BWD_MT=1"},
                  TcCfg{"attn_tc_causal_gqa_d64_t333_bwd1", 1, 333, 4, 2, 64, true, false,
                        "LLAMA3_ATTN_BWD_MT=1"},
                  TcCfg{"attn_tc_causal_doc_gqa_d64_t200_stsm", 2, 200, 4, 2, 64, true, true,
                        "LLAMA3_ATTN_BWD_STSM=1"},
                  TcCfg{"attn_tc_causal_gqa_d64_t333", 1, 333, 4, 2, 64, true, false},
                  TcCfg{"attn_tc_causal_doc_gqa4_d128_t200", 1, 200, 8, 2, 128, true, true},
                  TcCfg{"attn_tc_full_d128_t130", 1, 130, 2, 1, 128, false, false},
                  TcCfg{"attn_tc_doc_noncausal_d48_t70", 2, 70, 3, 1, 48, false, true},
                  TcCfg{"attn_tc_causal_doc_gqa_d64_t1024", 1, 1024, 2, 1, 64, true, true},
                  TcCfg{"attn_tc_causal_d128_t1024", 1, 1024, 2, 2, 128, true, false}}) {
    cs.push_back(
        {a.name, DType::f32, true, 2e-2, [a](const Ctx& c) {
           Tensor q = input(c, {a.B, a.T, a.H, a.D}, 90), k = input(c, {a.B, a.T, a.Hkv, a.D}, 91);
           Tensor v = input(c, {a.B, a.T, a.Hkv, a.D}, 92);
           AttentionParams p;
           p.causal = a.causal;
           p.compute = AttnCompute::bf16;
           if (a.docs) {
             // Document boundaries at 23, 63, 150, 300, 700 (row b shifted by 37 b):
             // runs that start and end inside 64-row tiles and runs spanning several
             // tiles.
             std::vector<int32_t> d(size_t(a.B * a.T));
             for (int64_t b = 0; b < a.B; ++b)
               for (int64_t t = 0; t < a.T; ++t) {
                 int32_t id = 0;
                 for (int64_t e : {23, 63, 150, 300, 700}) id += (t + 37 * b) >= e;
                 d[b * a.T + t] = id;
               }
             p.doc_ids = ints(c, d, {a.B, a.T});
           }
           std::list<ScopedEnv> sw;  // (a.env: space-separated NAME=VALUE pairs)
           for (std::string rest = a.env ? a.env : ""; !rest.empty();) {
             const size_t sp = rest.find(' ');
             const std::string kv = rest.substr(0, sp);
             rest = sp == std::string::npos ? "" : rest.substr(sp + 1);
             sw.emplace_back(kv.substr(0, kv.find('=')), kv.substr(kv.find('=') + 1).c_str());
           }
           return attention_fwd_bwd(c, q, k, v, p, 93);
         }});
  }

  // bf16 inputs and outputs with GQA (the bf16 step's attention), and the same with bf16 dK/dV
  // partials (LLAMA3_ATTN_GQA_PART_BF16=1, a candidate; bf16 outputs only).
  for (bool part16 : {false, true}) {
    cs.push_back({std::string("attn_tc_bf16_causal_doc_gqa_d64_t200") + (part16 ? "_part16" : ""),
                  DType::bf16, false, 2e-2, [part16](const Ctx& c) {
                    const int64_t B = 2, T = 200, H = 4, Hkv = 2, D = 64;
                    const ScopedEnv env("LLAMA3_ATTN_GQA_PART_BF16", part16 ? "1" : nullptr);
                    Tensor q = input(c, {B, T, H, D}, 94), k = input(c, {B, T, Hkv, D}, 95);
                    Tensor v = input(c, {B, T, Hkv, D}, 96);
                    AttentionParams p;
                    p.causal = true;
                    p.compute = AttnCompute::bf16;
                    std::vector<int32_t> d(size_t(B * T));
                    for (int64_t b = 0; b < B; ++b)
                      for (int64_t t = 0; t < T; ++t)
                        d[b * T + t] = int32_t((t + 37 * b) < 63 ? 0 : (t + 37 * b) < 150 ? 1 : 2);
                    p.doc_ids = ints(c, d, {B, T});
                    return attention_fwd_bwd(c, q, k, v, p, 97);
                  }});
  }

  // ---- queries at explicit key positions (AttentionParams::q_pos): a decoding chunk of 5
  // queries at the end of 150 keys, and a context-parallel load-balanced chunk (half the
  // queries at the start, half at the end of 200 keys), with documents and GQA; exact f32 and
  // tensor-core kernels.
  for (int variant = 0; variant < 4; ++variant) {
    const bool tc = variant >= 2, decode = variant % 2 == 0;
    const std::string name =
        std::string("attn_qpos_") + (decode ? "decode" : "cp_balanced") + (tc ? "_tc" : "_exact");
    cs.push_back({name, DType::f32, true, tc ? 2e-2 : 0, [tc, decode](const Ctx& c) {
                    const int64_t B = 2, T = decode ? 5 : 64, Tk = decode ? 150 : 200, H = 4,
                                  Hkv = 2, D = 64;
                    Tensor q = input(c, {B, T, H, D}, 130), k = input(c, {B, Tk, Hkv, D}, 131);
                    Tensor v = input(c, {B, Tk, Hkv, D}, 132);
                    std::vector<int32_t> qp(static_cast<size_t>(T)), d(static_cast<size_t>(B * Tk));
                    for (int64_t i = 0; i < T; ++i)
                      qp[size_t(i)] = int32_t(decode ? Tk - T + i : i < T / 2 ? i : Tk - (T - i));
                    for (int64_t b = 0; b < B; ++b)
                      for (int64_t t = 0; t < Tk; ++t)
                        d[size_t(b * Tk + t)] = int32_t((t + 29 * b) / 70);
                    AttentionParams p;
                    p.causal = true;
                    p.q_pos = ints(c, qp, {T});
                    p.doc_ids = ints(c, d, {B, Tk});
                    if (tc) p.compute = AttnCompute::bf16;
                    return attention_fwd_bwd(c, q, k, v, p, 133);
                  }});
  }

  // ---- cross-entropy with the classifier, chunked, ignored targets. bf16_logits: with bf16
  // inputs the CUDA backend's bf16 logits with their gradient in place
  // (LLAMA3_CE_BF16_LOGITS=1, a candidate; the CPU keeps f32 logits).
  // Their inputs: h (37, 24) from seed, w (V, 24) from seed + 1, and targets (i * mul) % V,
  // rows with i % skip == first ignored (-1).
  struct CeInputs {
    Tensor h, w, t;
  };
  auto ce_inputs = [](const Ctx& c, int64_t V, uint64_t seed, int skip, int first, int mul) {
    const int64_t N = 37, D = 24;
    std::vector<int32_t> tg(N);
    for (int64_t i = 0; i < N; ++i) tg[i] = i % skip == first ? -1 : int32_t((i * mul) % V);
    return CeInputs{input(c, {N, D}, seed), input(c, {V, D}, seed + 1, 0.5f), ints(c, tg, {N})};
  };
  auto linear_ce = [=](const Ctx& c, int64_t V, bool bf16_logits) {
    Backend& be = backend_for(c.dev);
    const int64_t N = 37, D = 24;
    const auto [h, w, t] = ce_inputs(c, V, 70, 5, 3, 37);
    Tensor dh = Tensor::empty({N, D}, DType::f32, c.dev);
    Tensor dw = input_f32(c, {V, D}, 72);  // overwritten (=): its old values must not leak in
    const ScopedEnv env("LLAMA3_CE_BF16_LOGITS", bf16_logits ? "1" : nullptr);
    const double loss = be.linear_cross_entropy(h, w, t, 16, 0.1f, &dh, &dw);
    const double loss_only = be.linear_cross_entropy(h, w, t, 64, 1.f, nullptr, nullptr);
    return std::vector<Tensor>{scalar(c, loss), scalar(c, loss_only), dh, dw};
  };
  both("linear_cross_entropy", true, [=](const Ctx& c) { return linear_ce(c, 301, false); });
  // (V = 300 runs the four-wide kernel, 301 the scalar one)
  for (const int64_t V : {300, 301})
    cs.push_back({"linear_cross_entropy_bf16logits_v" + std::to_string(V), DType::bf16, true, 0,
                  [=](const Ctx& c) { return linear_ce(c, V, true); }});

  // ---- the cross-entropy with its gradient deferred to the backward (CUDA's
  // linear_cross_entropy_keep / _grad, as ops::linear_cross_entropy uses them): the loss, then
  // dh (=) and dw accumulated into random values (+=) for the loss scaled by 0.1 times an
  // upstream gradient of 0.5 read on the device. Backends without the deferred form (the CPU)
  // give the reference: the fused call at scale 0.05 and a separate add.
  auto ce_deferred = [=](const Ctx& c, int64_t V, bool bf16_logits) {
    Backend& be = backend_for(c.dev);
    const int64_t N = 37, D = 24;
    const auto [h, w, t] = ce_inputs(c, V, 170, 6, 4, 41);
    Tensor g = Tensor::full({1}, 0.5, DType::f32, c.dev);
    Tensor dh = Tensor::empty({N, D}, DType::f32, c.dev);
    Tensor dw = input_f32(c, {V, D}, 172);        // accumulated into (+=)
    Tensor dw_fresh = input_f32(c, {V, D}, 173);  // overwritten (=)
    Tensor dh2 = Tensor::empty({N, D}, DType::f32, c.dev);
    const ScopedEnv env("LLAMA3_CE_BF16_LOGITS", bf16_logits ? "1" : nullptr);
    CrossEntropyKept kept, kept2;
    double total = 0, total2 = 0;
    if (be.linear_cross_entropy_keep(h, w, t, 0, 0.1f, kept, &total)) {
      be.linear_cross_entropy_grad(kept, h, w, t, g, dh, &dw, true);
      LLAMA3_CHECK(!kept.logits.defined(), "linear_cross_entropy_grad kept the logits");
      LLAMA3_CHECK(be.linear_cross_entropy_keep(h, w, t, 0, 0.1f, kept2, &total2), "keep");
      be.linear_cross_entropy_grad(kept2, h, w, t, g, dh2, &dw_fresh, false);
    } else {
      Tensor d1 = Tensor::empty({V, D}, DType::f32, c.dev);
      total = be.linear_cross_entropy(h, w, t, 0, 0.05f, &dh, &d1);
      be.axpy(1.f, d1, dw);
      total2 = be.linear_cross_entropy(h, w, t, 0, 0.05f, &dh2, &dw_fresh);
    }
    return std::vector<Tensor>{scalar(c, total), scalar(c, total2), dh, dw, dh2, dw_fresh};
  };
  both("linear_cross_entropy_deferred", true,
       [=](const Ctx& c) { return ce_deferred(c, 301, false); });
  for (const int64_t V : {300, 301})
    cs.push_back({"linear_cross_entropy_deferred_bf16logits_v" + std::to_string(V), DType::bf16,
                  true, 0, [=](const Ctx& c) { return ce_deferred(c, V, true); }});

  // ---- per-token log-probabilities (DPO, rejection sampling), chunked, ignored targets, with
  // the weighted gradient: dh written, dw accumulated (+=, onto random values)
  cs.push_back({"token_logprobs", DType::f32, true, 0, [](const Ctx& c) {
                  Backend& be = backend_for(c.dev);
                  const int64_t N = 37, D = 24, V = 301;
                  Tensor h = input_f32(c, {N, D}, 73), w = input_f32(c, {V, D}, 74, 0.5f);
                  std::vector<int32_t> tg(N);
                  for (int64_t i = 0; i < N; ++i) tg[i] = i % 6 == 2 ? -1 : int32_t((i * 53) % V);
                  Tensor t = ints(c, tg, {N});
                  Tensor rg = input_f32(c, {N}, 75);
                  Tensor dh = input_f32(c, {N, D}, 76);  // overwritten (=)
                  Tensor dw = input_f32(c, {V, D}, 77);  // accumulated (+=)
                  Tensor logp, logp_only;
                  be.token_logprobs(h, w, t, 16, logp, rg, &dh, &dw);
                  be.token_logprobs(h, w, t, 0, logp_only, Tensor(), nullptr, nullptr);
                  return std::vector<Tensor>{logp, logp_only, dh, dw};
                }});

  // ---- AdamW (f32 master weights), three steps; the last also writes the bf16 copy of the
  // weights (mixed precision's weight copies), which must equal the cast of the result.
  cs.push_back({"adamw_f32", DType::f32, true, 0, [](const Ctx& c) {
                  Backend& be = backend_for(c.dev);
                  Tensor p = input_f32(c, {1000}, 80), m = Tensor::zeros({1000}, DType::f32, c.dev);
                  Tensor v = Tensor::zeros({1000}, DType::f32, c.dev);
                  Tensor p16 = Tensor::empty({1000}, DType::bf16, c.dev);
                  for (int64_t s = 1; s <= 3; ++s) {
                    Tensor g = input_f32(c, {1000}, 80 + s);
                    AdamWParams ap;
                    ap.lr = 1e-2f, ap.weight_decay = 0.1f, ap.step = s, ap.grad_scale = 0.5f;
                    be.adamw_step(p, g, m, v, ap, s == 3 ? &p16 : nullptr);
                  }
                  const std::vector<float> a = p.to(DType::bf16).to(DType::f32).to_vector<float>();
                  const std::vector<float> b = p16.to(DType::f32).to_vector<float>();
                  LLAMA3_CHECK(a == b, "adamw: the bf16 copy differs from the cast of the weights");
                  return std::vector<Tensor>{p, m, v, p16};
                }});
  // 1003 elements (16-byte path and a scalar tail) and a view 4 bytes off alignment (scalar).
  cs.push_back({"adamw_f32_tail_and_misaligned", DType::f32, true, 0, [](const Ctx& c) {
                  Backend& be = backend_for(c.dev);
                  std::vector<Tensor> outs;
                  for (int64_t off : {0, 1}) {
                    const int64_t n = 1003;
                    Tensor p = input_f32(c, {n + off}, 90).narrow(0, off, n);
                    Tensor m = Tensor::zeros({n + off}, DType::f32, c.dev).narrow(0, off, n);
                    Tensor v = Tensor::zeros({n + off}, DType::f32, c.dev).narrow(0, off, n);
                    Tensor p16 = Tensor::empty({n + off}, DType::bf16, c.dev).narrow(0, off, n);
                    for (int64_t s = 1; s <= 2; ++s) {
                      Tensor g = input_f32(c, {n + off}, 90 + s).narrow(0, off, n);
                      AdamWParams ap;
                      ap.lr = 1e-2f, ap.weight_decay = 0.1f, ap.step = s;
                      be.adamw_step(p, g, m, v, ap, &p16);
                    }
                    outs.insert(outs.end(), {p, m, v, p16});
                  }
                  return outs;
                }});

  // ---- AdamW on several parameters in one call (CUDA: multi-tensor launches, their chunks
  // and four-wide tails), two steps: each item's own weight decay (p.weight_decay unused),
  // bf16 copies on some.
  cs.push_back({"adamw_many_f32", DType::f32, true, 0, [](const Ctx& c) {
                  Backend& be = backend_for(c.dev);
                  const std::vector<int64_t> sizes{1000, 3, 20000, 17};
                  std::vector<AdamWItem> items;
                  for (size_t i = 0; i < sizes.size(); ++i) {
                    const int64_t n = sizes[i];
                    AdamWItem it;
                    it.param = input_f32(c, {n}, 140 + i);
                    it.m = Tensor::zeros({n}, DType::f32, c.dev);
                    it.v = Tensor::zeros({n}, DType::f32, c.dev);
                    if (i % 2 == 0) it.param_bf16 = Tensor::empty({n}, DType::bf16, c.dev);
                    it.weight_decay = i % 2 == 0 ? 0.1f : 0.f;
                    items.push_back(it);
                  }
                  for (int64_t s = 1; s <= 2; ++s) {
                    for (size_t i = 0; i < items.size(); ++i)
                      items[i].grad = input_f32(c, {sizes[i]}, 150 + 10 * s + i);
                    AdamWParams ap;
                    ap.lr = 1e-2f, ap.step = s, ap.grad_scale = 0.5f, ap.weight_decay = 0.7f;
                    be.adamw_step_many(items, ap);
                  }
                  std::vector<Tensor> outs;
                  for (const AdamWItem& it : items) {
                    outs.insert(outs.end(), {it.param, it.m, it.v});
                    if (it.param_bf16.defined()) outs.push_back(it.param_bf16);
                  }
                  return outs;
                }});

  // ---- vocabulary-parallel cross-entropy statistics (Backend::vocab_*): a shard holding
  // columns [40, 40 + 300) of 13 rows, targets inside the shard, outside it and ignored (-1).
  cs.push_back({"vocab_shard_stats_loss_dlogits", DType::f32, true, 0, [](const Ctx& c) {
                  Backend& be = backend_for(c.dev);
                  const int64_t C = 13, V = 300, v0 = 40;
                  Tensor logits = input_f32(c, {C, V}, 120, 3.f);
                  std::vector<int32_t> tv(static_cast<size_t>(C));
                  for (int64_t i = 0; i < C; ++i)
                    tv[size_t(i)] = i % 4 == 1   ? -1
                                    : i % 4 == 2 ? int32_t(v0 + V + i)
                                                 : int32_t(v0 + (i * 37) % V);
                  Tensor tg = ints(c, tv, {C});
                  Tensor mx = Tensor::empty({C}, DType::f32, c.dev),
                         se = Tensor::empty({C}, DType::f32, c.dev);
                  Tensor tl = Tensor::empty({C}, DType::f32, c.dev),
                         loss = Tensor::empty({C}, DType::f32, c.dev);
                  Tensor valid = Tensor::empty({C}, DType::f32, c.dev);
                  be.vocab_shard_max(logits, mx);
                  be.vocab_shard_stats(logits, mx, tg, v0, se, tl);
                  be.vocab_row_loss(mx, se, tl, tg, loss, valid);
                  Tensor dl = logits.clone();
                  be.vocab_shard_dlogits(dl, mx, se, tg, v0, 0.25f);
                  return std::vector<Tensor>{mx, se, tl, loss, valid, dl};
                }});

  // ---- a whole model step through runtime/ops (forward + backward)
  // Third variant: bf16 mixed precision with the tensor-core attention. Fourth: as the model
  // does on a backend that prefers bf16 activations (bf16_activations: q/k/v, RoPE,
  // attention with an f32 lse, gate/up and SwiGLU in bf16 on CUDA; the CPU reference stays
  // f32).
  for (int variant : {0, 1, 2, 3}) {
    const bool mixed = variant > 0, tc_attn = variant >= 2, mlp16 = variant == 3;
    Case mc;
    mc.name = variant == 0   ? "model_step_f32"
              : variant == 1 ? "model_step_bf16_mixed"
              : variant == 2 ? "model_step_bf16_mixed_tc_attention"
                             : "model_step_bf16_activations_tc_attention";
    mc.dtype = DType::f32;  // activations and master weights f32; bf16 only in GEMM inputs
    mc.cpu_has_dtype = true;
    mc.tol = tc_attn ? 2e-2 : mixed ? 1e-2 : 1e-5;
    mc.run = [mixed, tc_attn, mlp16](const Ctx& c) {
      const bool act16 = mlp16 && ops::bf16_activations(ops::Precision::bf16, c.dev);
      const int64_t B = 2, T = 40, D = 64, H = 4, Hkv = 2, Dh = 16, F = 96, V = 97;
      const ops::Precision pr = mixed ? ops::Precision::bf16 : ops::Precision::f32;
      auto param = [&](const Shape& s, uint64_t seed, float sc) {
        Tensor t = input_f32(c, s, seed, sc);
        t.set_requires_grad(true);
        return t;
      };
      auto ones_param = [&](int64_t n) {
        Tensor t = Tensor::full({n}, 1.0, DType::f32, c.dev);
        t.set_requires_grad(true);
        return t;
      };
      Tensor emb = param({V, D}, 100, 1.f), wq = param({H * Dh, D}, 101, 0.125f);
      Tensor wk = param({Hkv * Dh, D}, 102, 0.125f), wv = param({Hkv * Dh, D}, 103, 0.125f);
      Tensor wo = param({D, H * Dh}, 104, 0.125f), n1 = ones_param(D), n2 = ones_param(D);
      Tensor w1 = param({F, D}, 105, 0.125f), w3 = param({F, D}, 106, 0.125f);
      Tensor w2 = param({D, F}, 107, 0.1f), nf = ones_param(D), head = param({V, D}, 108, 0.125f);
      std::vector<int32_t> ids(B * T), tg(B * T), doc(B * T), pos(T);
      for (int64_t i = 0; i < B * T; ++i) {
        ids[i] = int32_t((i * 31 + 7) % V);
        tg[i] = i % 9 == 4 ? -1 : int32_t((i * 17 + 3) % V);
        doc[i] = int32_t((i % T) < 15 ? 0 : 1);
      }
      for (int64_t t = 0; t < T; ++t) pos[t] = int32_t(t);
      std::vector<float> f(Dh / 2);
      for (int64_t j = 0; j < Dh / 2; ++j) f[j] = float(std::pow(500000.0, -2.0 * j / Dh));
      Tensor inv = Tensor::from_vector(f, {Dh / 2}, c.dev), pt = ints(c, pos, {T});
      AttentionParams ap;
      ap.causal = true;
      ap.doc_ids = ints(c, doc, {B, T});
      if (tc_attn) ap.compute = AttnCompute::bf16;

      Tensor x = ops::embedding(emb, ints(c, ids, {B, T}));  // (B, T, D)
      // (With act16 the norms write bf16, and their gradients from q/k/v or gate/up sum in f32.)
      Tensor h = ops::rmsnorm(x, n1, 1e-5f, act16);
      Tensor q =
          ops::rope(ops::reshape(ops::linear(h, wq, pr, act16, true), {B, T, H, Dh}), inv, pt);
      Tensor k =
          ops::rope(ops::reshape(ops::linear(h, wk, pr, act16, true), {B, T, Hkv, Dh}), inv, pt);
      Tensor v = ops::reshape(ops::linear(h, wv, pr, act16, true), {B, T, Hkv, Dh});
      Tensor a = ops::reshape(ops::attention(q, k, v, ap), {B, T, H * Dh});
      x = ops::add(x, ops::linear(a, wo, pr));
      h = ops::rmsnorm(x, n2, 1e-5f, act16);
      Tensor ff =
          ops::swiglu(ops::linear(h, w1, pr, act16, true), ops::linear(h, w3, pr, act16, true));
      x = ops::add(x, ops::linear(ff, w2, pr));
      h = ops::reshape(ops::rmsnorm(x, nf, 1e-5f), {B * T, D});
      ops::CrossEntropyOptions co;
      co.chunk = 32;
      co.precision = pr;
      Tensor loss = ops::linear_cross_entropy(h, head, ints(c, tg, {B * T}), co);
      loss.backward();
      std::vector<Tensor> outs{loss};
      for (Tensor* t : {&emb, &wq, &wk, &wv, &wo, &n1, &n2, &w1, &w3, &w2, &nf, &head})
        outs.push_back(t->grad());
      return outs;
    };
    cs.push_back(mc);
  }
  return cs;
}

double normalised_error(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = double(got[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

class BackendParity : public ::testing::TestWithParam<Case> {};

TEST_P(BackendParity, CudaMatchesCpu) {
  if (!cuda_init()) GTEST_SKIP() << "no CUDA device (cuda_init() returned false)";
  const Case& cs = GetParam();
  const bool bf = cs.dtype == DType::bf16;
  const double tol = cs.tol > 0 ? cs.tol : (bf ? 1e-2 : 1e-5);
  Ctx cpu{Device::cpu(), bf && !cs.cpu_has_dtype ? DType::f32 : cs.dtype, cs.dtype};
  Ctx gpu{Device::cuda(0), cs.dtype, cs.dtype};
  std::vector<Tensor> ref = cs.run(cpu);
  std::vector<Tensor> got = cs.run(gpu);
  backend_for(gpu.dev).synchronize();
  ASSERT_EQ(ref.size(), got.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_EQ(ref[i].shape(), got[i].shape()) << "output " << i;
    std::vector<float> r = ref[i].to_vector<float>(), g = got[i].to_vector<float>();
    bool finite = true;
    for (float x : g) finite &= std::isfinite(x) || !std::isfinite(r[&x - g.data()]);
    EXPECT_TRUE(finite) << cs.name << ": output " << i << " has non-finite values on cuda";
    const double err = normalised_error(g, r);
    EXPECT_LT(err, tol) << cs.name << ": output " << i << " " << ref[i].str()
                        << " normalised error " << err << " (tolerance " << tol << ")";
  }
}

// The reference side of every case runs everywhere, so the cases themselves are checked on
// CPU-only machines too.
TEST_P(BackendParity, CpuReferenceRunsAndIsFinite) {
  const Case& cs = GetParam();
  Ctx cpu{Device::cpu(), cs.dtype == DType::bf16 && !cs.cpu_has_dtype ? DType::f32 : cs.dtype,
          cs.dtype};
  std::vector<Tensor> ref = cs.run(cpu);
  ASSERT_FALSE(ref.empty());
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_TRUE(ref[i].defined()) << "output " << i;
    for (float x : ref[i].to_vector<float>()) ASSERT_TRUE(std::isfinite(x)) << "output " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(AllOps, BackendParity, ::testing::ValuesIn(make_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

TEST(CudaInit, ReturnsFalseWithoutDeviceAndIsIdempotent) {
  const bool a = cuda_init(), b = cuda_init();
  EXPECT_EQ(a, b);
  EXPECT_EQ(a, cuda_device_count() > 0);
  if (!a) {
    EXPECT_FALSE(has_backend(Device::cuda(0)));
  }
}

TEST(CudaBackend, RejectsF64WithTheSupportedList) {
  if (!cuda_init()) GTEST_SKIP() << "no CUDA device";
  Tensor x = Tensor::zeros({4}, DType::f32, Device::cuda(0));
  try {
    Tensor y = Tensor::empty({4}, DType::f64, Device::cuda(0));
    backend_for(Device::cuda(0)).scale(y, 2.f);
    FAIL() << "f64 scale on cuda did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("supported: f32, bf16"), std::string::npos) << e.what();
  }
}

// Determinism (the CUDA graph test compares a captured step with an eager one bit for bit):
// the embedding backward adds a repeated token's gradient rows in position order, the CPU's
// order, so f32 tables match the CPU's bits (f32 atomics added them in arrival order), and
// reductions add their block partials in block order, so 20 runs give one result.
TEST(CudaBackend, EmbeddingBackwardAddsInPositionOrder) {
  if (!cuda_init()) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 5000, V = 6, d = 96;  // runs of about 1000 positions, over 4 rank tiles
  std::mt19937 gen(5);
  std::vector<int32_t> idv(n);
  for (auto& i : idv) i = int32_t(gen() % 4) + (gen() % 3 == 0 ? 2 : 0);  // row 1 absent
  std::normal_distribution<float> nd;
  std::vector<float> gv(n * d), wv(V * d);
  for (auto& x : gv) x = nd(gen);
  for (auto& x : wv) x = nd(gen);
  Tensor ids = Tensor::from_vector(idv, {n}), g = Tensor::from_vector(gv, {n, d});
  Tensor want = Tensor::from_vector(wv, {V, d});
  backend_for(Device::cpu()).embedding_backward(g, ids, want);
  for (int run = 0; run < 3; ++run) {
    Tensor got = Tensor::from_vector(wv, {V, d}).to(Device::cuda(0));
    backend_for(Device::cuda(0))
        .embedding_backward(g.to(Device::cuda(0)), ids.to(Device::cuda(0)), got);
    EXPECT_EQ(got.to(Device::cpu()).to_vector<float>(), want.to_vector<float>()) << "run " << run;
  }
}

TEST(CudaBackend, SumSquaresIsTheSameOnEveryRun) {
  if (!cuda_init()) GTEST_SKIP() << "no CUDA device";
  const int64_t n = int64_t(1) << 20;  // all 528 blocks
  std::mt19937 gen(6);
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = nd(gen);
  Tensor x = Tensor::from_vector(v, {n}).to(Device::cuda(0));
  Backend& be = backend_for(Device::cuda(0));
  const double first = be.sum_squares(x);
  double want = 0;
  for (float f : v) want += double(f) * f;
  EXPECT_NEAR(first, want, 1e-12 * want);
  for (int run = 0; run < 20; ++run) EXPECT_EQ(be.sum_squares(x), first) << "run " << run;
}

}  // namespace
