// One Llama-style training step on cuda:0 built directly from runtime/ops (embedding, per
// layer rmsnorm / q,k,v linears / RoPE / causal GQA attention / o linear / residual /
// rmsnorm / w1,w3 / SwiGLU / w2 / residual, final rmsnorm, chunked linear cross-entropy,
// backward, AdamW over every parameter) in bf16 mixed precision as the model runs it (bf16
// GEMM inputs, f32 accumulation, f32 master weights, residual stream and norms; attention on
// tensor cores with f32 softmax and accumulation; where the backend prefers bf16
// activations, q/k/v/attention and gate/up/SwiGLU activations in bf16). Prints tokens/s and
// MFU against the H100 SXM dense bf16 peak (989 TFLOP/s).
//
//   bench_cuda_step [--seq 4096] [--batch 1] [--layers 16] [--dim 2048] [--heads 32]
//                   [--kv-heads 8] [--ffn 8192] [--vocab 128256] [--steps 3] [--warmup 1]
//                   [--precision bf16|f32] [--attn-only] [--device cuda|cpu] [--profile]
//                   [--f32-attn-activations] [--ce-chunk ROWS] [--separate-sums]
//                   [--cast-weights] [--graph] [--accum N] [--separate-residual]
//                   [--optimizer-only] [--cast-residual-grads]
//
// --accum N: N micro-batches of (batch, seq) per optimizer step (gradient accumulation, as
// the trainer's grad_accum): N forward/backward passes whose gradients sum in the weights'
// gradients, then one AdamW update. Tokens per step and MFU count all N; the optimizer's
// fixed cost is spread over N times the tokens, as in any run with a realistic global batch.
//
// In bf16 mixed precision AdamW writes bf16 copies of the weight matrices with each update
// and the GEMMs use them (ops::WeightCopyTable, as the trainer does); --cast-weights casts
// every weight to bf16 each step instead, as before the copies existed (A/B).
// --graph captures the step (forward, backward, AdamW) as a CUDA graph on the second step and
// replays it from then on, as the trainer does with TrainerConfig::cuda_graph: the learning
// rate's scalars go up before each replay and the loss comes back after it (A/B against the
// eager step, which launches every kernel from the host).
// The residual adds after the o and down projections happen in their GEMMs
// (ops::linear_residual: cuBLASLt's epilogue reads the residual), as in the model;
// --separate-residual runs them as separate adds, as before (A/B).
// --separate-sums turns off the in-place gradient sums (autograd::set_in_place_accumulation):
// every sum of two gradients is then a separate add pass, as before they existed (A/B).
// --cast-residual-grads turns off the bf16 gradient copies (autograd::set_bf16_grad_copies):
// the o and down projections' backward casts the residual stream's f32 gradient itself
// instead of reading the bf16 rounding the RMSNorm backward wrote with it (A/B).
// --ce-chunk sets the cross-entropy's rows per chunk (default: the backend's choice, as the
// model's ce_chunk of 0: on CUDA rows of up to 4 GiB of f32 logits, so every row of a 4096- or
// 8192-token step in one chunk, as PyTorch eager materialises the whole (tokens, vocab)
// logits; --ce-chunk 1024, the CPU's choice, gives four dW GEMMs that each read and rewrite
// the 1 GB f32 classifier gradient).
// --attn-only times attention forward+backward alone for the same shapes (f32 inputs on the
// exact f32 kernels; f32 inputs with compute = bf16 and bf16 inputs on the tensor-core
// kernels), to compare with torch's scaled_dot_product_attention (bench/cuda_step_peer.py).
// --optimizer-only times the optimizer's work of a captured step alone on the model's
// parameters: the clipping state from every gradient (Backend::grad_clip_state) and AdamW on
// every parameter with the matrices' bf16 copies (Backend::adamw_step_many), as multi-tensor
// launches and as one launch per tensor (LLAMA3_MULTI_TENSOR=0) in the same run.
// --profile runs one more step after the timed ones with CUDA events around every backend
// call and prints the GPU time per op (GEMMs by shape, copies by dtypes), largest first.
// Exits 77 when there is no CUDA device.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "runtime/autograd/autograd.h"
#include "runtime/backend/backend.h"
#include "runtime/core/allocator.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/ops/ops.h"

using namespace llama3;

namespace {

struct Config {
  int64_t seq = 4096, batch = 1, layers = 16, dim = 2048, heads = 32, kv_heads = 8, ffn = 8192,
          vocab = 128256, steps = 3, warmup = 1, ce_chunk = 0,  // 0: the backend's choice
      accum = 1;                                                // micro-batches per step
  ops::Precision precision = ops::Precision::bf16;
  bool attn_only = false;
  bool optimizer_only = false;
  bool profile = false;             // one more step after the timed ones, with per-op GPU times
  bool f32_attn_act = false;        // keep q/k/v/attention activations f32 (A/B timing)
  bool cast_weights = false;        // no bf16 weight copies: cast each step (A/B timing)
  bool graph = false;               // replay a captured CUDA graph from the second step on
  bool separate_residual = false;   // residual adds as separate ops (A/B timing)
  Device device = Device::cuda(0);  // --device cpu: smoke test of this benchmark on tiny configs
  int64_t head_dim() const { return dim / heads; }
};

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> int64_t {
      LLAMA3_CHECK(i + 1 < argc, "{} needs a value", a);
      return std::atoll(argv[++i]);
    };
    if (a == "--seq")
      c.seq = next();
    else if (a == "--batch")
      c.batch = next();
    else if (a == "--layers")
      c.layers = next();
    else if (a == "--dim")
      c.dim = next();
    else if (a == "--heads")
      c.heads = next();
    else if (a == "--kv-heads")
      c.kv_heads = next();
    else if (a == "--ffn")
      c.ffn = next();
    else if (a == "--vocab")
      c.vocab = next();
    else if (a == "--steps")
      c.steps = next();
    else if (a == "--warmup")
      c.warmup = next();
    else if (a == "--attn-only")
      c.attn_only = true;
    else if (a == "--optimizer-only")
      c.optimizer_only = true;
    else if (a == "--profile")
      c.profile = true;
    else if (a == "--separate-sums")
      autograd::set_in_place_accumulation(false);
    else if (a == "--cast-residual-grads")
      autograd::set_bf16_grad_copies(false);
    else if (a == "--ce-chunk")
      c.ce_chunk = next();
    else if (a == "--f32-attn-activations")
      c.f32_attn_act = true;
    else if (a == "--cast-weights")
      c.cast_weights = true;
    else if (a == "--graph")
      c.graph = true;
    else if (a == "--separate-residual")
      c.separate_residual = true;
    else if (a == "--accum")
      c.accum = next();
    else if (a == "--device") {
      LLAMA3_CHECK(i + 1 < argc, "--device needs cuda or cpu");
      std::string d = argv[++i];
      LLAMA3_CHECK(d == "cuda" || d == "cpu", "--device {} (supported: cuda, cpu)", d);
      c.device = d == "cuda" ? Device::cuda(0) : Device::cpu();
    } else if (a == "--precision") {
      LLAMA3_CHECK(i + 1 < argc, "--precision needs bf16 or f32");
      std::string p = argv[++i];
      LLAMA3_CHECK(p == "bf16" || p == "f32", "--precision {} (supported: bf16, f32)", p);
      c.precision = p == "bf16" ? ops::Precision::bf16 : ops::Precision::f32;
    } else {
      fail("unknown argument {} (see the header of bench/bench_cuda_step.cpp)", a);
    }
  }
  LLAMA3_CHECK(!c.graph || !c.device.is_cpu(), "--graph needs --device cuda (CUDA graphs)");
  LLAMA3_CHECK(c.accum >= 1, "--accum {}: at least one micro-batch per step", c.accum);
  if (c.graph) c.warmup = std::max<int64_t>(c.warmup, 2);  // step 2 captures: not timed
  LLAMA3_CHECK(c.dim % c.heads == 0 && c.heads % c.kv_heads == 0,
               "dim {} / heads {} / kv heads {} do not divide", c.dim, c.heads, c.kv_heads);
  return c;
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Fills a device tensor from a pool of random values (fast init of ~1.5B parameters).
void init_param(Tensor& t, const std::vector<float>& pool, size_t& cursor) {
  const int64_t n = t.numel();
  Tensor flat = t.view({n});
  for (int64_t off = 0; off < n;) {
    if (cursor >= pool.size()) cursor = 0;
    const int64_t len = std::min<int64_t>(n - off, int64_t(pool.size() - cursor));
    Tensor part = flat.narrow(0, off, len);
    backend_for(t.device()).copy_from_host(pool.data() + cursor, size_t(len) * 4, part);
    off += len, cursor += size_t(len) * 7 % pool.size() + 1;
  }
}

struct Layer {
  Tensor attn_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2;
};

int attn_only(const Config& c) {
  const Device dev = c.device;
  Backend& be = backend_for(dev);
  const int64_t B = c.batch, T = c.seq, H = c.heads, Hk = c.kv_heads, Dh = c.head_dim();
  const double flops = 3.5 * 4.0 * double(B) * double(T) * double(T) * double(H) * double(Dh) / 2;
  // (f32 inputs, exact f32 kernel), (f32 inputs, compute = bf16: tensor cores, as in the bf16
  // mixed-precision step), (bf16 inputs: tensor cores).
  // The tensor-core variants with one kernel choice reverted (the backend's A/B switches,
  // runtime/cuda/cuda_backend.cpp), to measure what each choice gains in the same run.
  struct Variant {
    DType dt;
    AttnCompute compute;
    const char* result;         // RESULT key (scripts/gpu-check.sh greps attn_ms_f32 / ...)
    const char* env = nullptr;  // switches set for this variant only (NAME=VALUE, space-separated)
    const char* what = "";      // its description
  };
  const char* switches[] = {"LLAMA3_ATTN_GQA_SPLIT", "LLAMA3_ATTN_STATS_PREFETCH",
                            "LLAMA3_ATTN_FWD_MT", "LLAMA3_ATTN_BWD_MT", "LLAMA3_ATTN_BWD_STSM"};
  for (Variant var :
       {Variant{DType::f32, AttnCompute::exact, "attn_ms_f32"},
        Variant{DType::f32, AttnCompute::bf16, "attn_tc_ms_f32"},
        Variant{DType::f32, AttnCompute::bf16, "attn_tc_nosplit_ms_f32", "LLAMA3_ATTN_GQA_SPLIT=0",
                ", backward one block per kv head"},
        Variant{DType::f32, AttnCompute::bf16, "attn_tc_noprefetch_ms_f32",
                "LLAMA3_ATTN_STATS_PREFETCH=0", ", lse/dsum not prefetched"},
        Variant{DType::f32, AttnCompute::bf16, "attn_tc_fwd1_ms_f32", "LLAMA3_ATTN_FWD_MT=1",
                ", forward one m-tile per warp"},
        Variant{DType::f32, AttnCompute::bf16, "attn_tc_bwd1_ms_f32", "LLAMA3_ATTN_BWD_MT=1",
                ", backward 64-key blocks, 64-query tiles (the previous default)"},
        Variant{DType::f32, AttnCompute::bf16, "attn_tc_stsm_ms_f32", "LLAMA3_ATTN_BWD_STSM=1",
                ", backward dS by stmatrix"},
        Variant{DType::bf16, AttnCompute::bf16, "attn_ms_bf16"}}) {
    const DType dt = var.dt;
    for (const char* sw : switches) unsetenv(sw);
    if (var.env) {  // space-separated NAME=VALUE pairs
      std::string rest = var.env;
      while (!rest.empty()) {
        const size_t sp = rest.find(' ');
        const std::string kv = rest.substr(0, sp);
        rest = sp == std::string::npos ? "" : rest.substr(sp + 1);
        setenv(kv.substr(0, kv.find('=')).c_str(), kv.substr(kv.find('=') + 1).c_str(), 1);
      }
    }
    if (dev.is_cpu() && (dt == DType::bf16 || var.compute != AttnCompute::exact))
      continue;  // the CPU attention is f32/f64 and ignores `compute`
    std::vector<float> pool(size_t(1) << 22);
    std::mt19937 g(1);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& x : pool) x = nd(g);
    size_t cur = 0;
    auto make = [&](const Shape& s) {
      Tensor f = Tensor::empty(s, DType::f32, dev);
      init_param(f, pool, cur);
      return f.to(dt);
    };
    Tensor q = make({B, T, H, Dh}), k = make({B, T, Hk, Dh}), v = make({B, T, Hk, Dh});
    Tensor go = make({B, T, H, Dh});
    Tensor out = Tensor::empty(q.shape(), dt, dev);
    Tensor lse = Tensor::empty({B, H, T}, DType::f32, dev);  // f32 as ops::attention allocates it
    Tensor dq = Tensor::empty(q.shape(), dt, dev), dk = Tensor::empty(k.shape(), dt, dev);
    Tensor dv = Tensor::empty(v.shape(), dt, dev);
    AttentionParams p;
    p.causal = true;
    p.compute = var.compute;
    double tf = 0, tb = 0;
    const int reps = 5;
    for (int r = -1; r < reps; ++r) {
      be.synchronize();
      const double t0 = now();
      be.attention_forward(q, k, v, p, out, lse);
      be.synchronize();
      const double t1 = now();
      be.attention_backward(go, q, k, v, out, lse, p, dq, dk, dv);
      be.synchronize();
      const double t2 = now();
      if (r >= 0) tf += t1 - t0, tb += t2 - t1;
    }
    tf /= reps, tb /= reps;
    fmt::print(
        "attention {} inputs, {}{} B={} T={} H={} Hkv={} Dh={} causal: fwd {:.2f} ms, "
        "bwd {:.2f} ms, fwd+bwd {:.2f} ms ({:.1f} TFLOP/s)\n",
        dtype_name(dt),
        dt == DType::bf16 || var.compute == AttnCompute::bf16 ? "tensor cores (bf16 products)"
                                                              : "exact f32",
        var.what, B, T, H, Hk, Dh, tf * 1e3, tb * 1e3, (tf + tb) * 1e3, flops / (tf + tb) / 1e12);
    fmt::print("RESULT {} {:.3f}\n", var.result, (tf + tb) * 1e3);
  }
  for (const char* sw : switches) unsetenv(sw);
  return 0;
}

int optimizer_only(const Config& c) {
  const Device dev = c.device;
  Backend& be = backend_for(dev);
  const int64_t D = c.dim, Dh = c.head_dim(), Hq = c.heads * Dh, Hk = c.kv_heads * Dh;
  // The parameters of run(), in its order.
  std::vector<Shape> shapes{{c.vocab, D}};
  for (int64_t l = 0; l < c.layers; ++l)
    for (const Shape& s : std::vector<Shape>{
             {D}, {Hq, D}, {Hk, D}, {Hk, D}, {D, Hq}, {D}, {c.ffn, D}, {c.ffn, D}, {D, c.ffn}})
      shapes.push_back(s);
  shapes.push_back({D});
  shapes.push_back({c.vocab, D});
  std::vector<AdamWItem> items;
  std::vector<Tensor> grads;
  int64_t n = 0, n_copies = 0;
  for (const Shape& s : shapes) {
    AdamWItem it;
    it.param = Tensor::full(s, 0.01, DType::f32, dev);
    it.grad = Tensor::full(s, 1e-3, DType::f32, dev);
    it.m = Tensor::zeros(s, DType::f32, dev), it.v = Tensor::zeros(s, DType::f32, dev);
    if (s.size() == 2)
      it.param_bf16 = Tensor::empty(s, DType::bf16, dev), n_copies += it.param.numel();
    it.weight_decay = s.size() == 2 ? 0.1f : 0.f;
    n += it.param.numel();
    grads.push_back(it.grad);
    items.push_back(std::move(it));
  }
  Tensor state = Tensor::zeros({AdamWDynamic::size}, DType::f32, dev);
  AdamWParams ap;
  ap.lr = 3e-4f, ap.dynamic = state;
  const AdamWStepScalars sc = adamw_step_scalars(ap);
  const float host[3] = {sc.step_size, sc.bc2_sqrt, sc.decay};
  Tensor tail = state.narrow(0, AdamWDynamic::step_size, 3);
  be.copy_from_host(host, sizeof host, tail);
  const int64_t reps = std::max<int64_t>(c.steps, 10);
  // Mean ms of f() over reps runs after one untimed run, with LLAMA3_MULTI_TENSOR=multi.
  auto time_ms = [&](bool multi, const std::function<void()>& f) {
    setenv("LLAMA3_MULTI_TENSOR", multi ? "1" : "0", 1);
    f();
    be.synchronize();
    const double t0 = now();
    for (int64_t r = 0; r < reps; ++r) f();
    be.synchronize();
    return (now() - t0) * 1e3 / double(reps);
  };
  auto norm = [&] { be.grad_clip_state(grads, Tensor(), 1.f, state); };
  auto update = [&] { be.adamw_step_many(items, ap); };
  const double norm_multi = time_ms(true, norm), norm_each = time_ms(false, norm);
  const double adamw_multi = time_ms(true, update), adamw_each = time_ms(false, update);
  unsetenv("LLAMA3_MULTI_TENSOR");
  // Bytes: AdamW reads param, grad and both moments and writes param and moments (28 per
  // parameter) plus the 2-byte copies; the norm reads the gradients.
  const double adamw_bytes = 28.0 * double(n) + 2.0 * double(n_copies);
  fmt::print("device {}: {} parameters in {} tensors, {} runs each\n", be.name(), n, shapes.size(),
             reps);
  fmt::print(
      "RESULT optimizer params={} tensors={} adamw_multi_ms={:.3f} adamw_per_tensor_ms={:.3f} "
      "adamw_ratio={:.3f} adamw_multi_gbs={:.0f} norm_multi_ms={:.3f} norm_per_tensor_ms={:.3f} "
      "norm_ratio={:.3f} norm_multi_gbs={:.0f}\n",
      n, shapes.size(), adamw_multi, adamw_each, adamw_multi / adamw_each,
      adamw_bytes / adamw_multi * 1e-6, norm_multi, norm_each, norm_multi / norm_each,
      4.0 * double(n) / norm_multi * 1e-6);
  return 0;
}

int run(const Config& c) {
  const Device dev = c.device;
  Backend& be = backend_for(dev);
  const int64_t B = c.batch, T = c.seq, D = c.dim, H = c.heads, Hk = c.kv_heads, Dh = c.head_dim(),
                F = c.ffn, V = c.vocab;
  fmt::print(
      "device {}\nconfig: dim {} layers {} heads {} kv heads {} ffn {} vocab {} seq {} "
      "batch {} x {} micro-batches per step, precision {} cross-entropy chunk {} rows\n",
      be.name(), D, c.layers, H, Hk, F, V, T, B, c.accum,
      c.precision == ops::Precision::bf16 ? "bf16 mixed" : "f32",
      std::min(B * T, c.ce_chunk > 0 ? c.ce_chunk : be.cross_entropy_chunk(V)));

  double t0 = now();
  std::vector<float> pool(size_t(1) << 24);
  {
    std::mt19937 g(42);
    std::normal_distribution<float> nd(0.f, 0.02f);
    for (auto& x : pool) x = nd(g);
  }
  size_t cursor = 0;
  std::vector<Tensor*> params;
  auto weight = [&](Tensor& t, const Shape& s) {
    t = Tensor::empty(s, DType::f32, dev);
    init_param(t, pool, cursor);
    t.set_requires_grad(true);
    params.push_back(&t);
  };
  auto norm = [&](Tensor& t) {
    t = Tensor::full({D}, 1.0, DType::f32, dev);
    t.set_requires_grad(true);
    params.push_back(&t);
  };
  Tensor emb, final_norm, head;
  std::vector<Layer> layers(size_t(c.layers));
  weight(emb, {V, D});
  for (auto& l : layers) {
    norm(l.attn_norm), weight(l.wq, {H * Dh, D}), weight(l.wk, {Hk * Dh, D});
    weight(l.wv, {Hk * Dh, D}), weight(l.wo, {D, H * Dh}), norm(l.ffn_norm);
    weight(l.w1, {F, D}), weight(l.w3, {F, D}), weight(l.w2, {D, F});
  }
  norm(final_norm), weight(head, {V, D});
  std::vector<Tensor> m, v;
  int64_t n_params = 0;
  for (Tensor* p : params) {
    m.push_back(Tensor::zeros(p->shape(), DType::f32, dev));
    v.push_back(Tensor::zeros(p->shape(), DType::f32, dev));
    n_params += p->numel();
  }
  // bf16 copies of the weight matrices, written by AdamW (the trainer's bf16 path).
  ops::WeightCopyTable copies;
  std::vector<int64_t> copy_of(params.size(), -1);
  if (c.precision == ops::Precision::bf16 && !c.cast_weights)
    for (size_t i = 0; i < params.size(); ++i)
      if (params[i]->dim() == 2) copy_of[i] = int64_t(copies.add(*params[i]));
  const int64_t n_embed = V * D;
  const int64_t n_matmul = n_params - n_embed;  // every parameter but the lookup table
  std::vector<int32_t> ids(static_cast<size_t>(B * T)), tg(static_cast<size_t>(B * T)),
      pos(static_cast<size_t>(T));
  std::mt19937 g(7);
  for (auto& x : ids) x = int32_t(g() % uint32_t(V));
  for (size_t i = 0; i < tg.size(); ++i) tg[i] = ids[(i + 1) % ids.size()];
  for (int64_t t = 0; t < T; ++t) pos[size_t(t)] = int32_t(t);
  std::vector<float> inv(size_t(Dh / 2));
  for (int64_t j = 0; j < Dh / 2; ++j)
    inv[size_t(j)] = float(std::pow(500000.0, -2.0 * double(j) / double(Dh)));
  Tensor ids_t = Tensor::from_vector(ids, {B, T}, dev),
         tg_t = Tensor::from_vector(tg, {B * T}, dev);
  Tensor pos_t = Tensor::from_vector(pos, {T}, dev),
         inv_t = Tensor::from_vector(inv, {Dh / 2}, dev);
  be.synchronize();
  fmt::print("parameters: {:.3f} B ({:.3f} B without the embedding table); init {:.1f} s\n",
             double(n_params) / 1e9, double(n_matmul) / 1e9, now() - t0);

  const auto pr = c.precision;
  AttentionParams ap;
  ap.causal = true;
  // As the model (text/model/llama.cpp): bf16 mixed precision lets attention multiply in bf16
  // on tensor cores (f32 accumulation), and where the backend prefers bf16 activations the
  // q/k/v, attention and gate/up/SwiGLU activations are bf16 (--f32-attn-activations keeps
  // the attention path's f32, to measure what that gains).
  if (pr == ops::Precision::bf16) ap.compute = AttnCompute::bf16;
  const bool act16 = ops::bf16_activations(pr, dev);
  const bool attn16 = act16 && !c.f32_attn_act;
  // One micro-batch's forward and backward (its gradients add into the weights'); returns
  // its mean loss without reading it.
  const Tensor seed = Tensor::full({1}, 1.0 / double(c.accum), DType::f32, dev);
  auto micro_batch = [&]() {
    Tensor x = ops::embedding(emb, ids_t);  // (B, T, D)
    // (As the model: the residual added by the projection's GEMM.)
    auto residual = [&](const Tensor& in, const Tensor& w, const Tensor& r) {
      return c.separate_residual ? ops::add(r, ops::linear(in, w, pr))
                                 : ops::linear_residual(in, w, r, pr);
    };
    for (auto& l : layers) {
      // (As the model: bf16 norm outputs, whose gradients from q/k/v or gate/up sum in f32.)
      Tensor h = ops::rmsnorm(x, l.attn_norm, 1e-5f, attn16);
      Tensor q = ops::rope(ops::reshape(ops::linear(h, l.wq, pr, attn16, true), {B, T, H, Dh}),
                           inv_t, pos_t);
      Tensor k = ops::rope(ops::reshape(ops::linear(h, l.wk, pr, attn16, true), {B, T, Hk, Dh}),
                           inv_t, pos_t);
      Tensor vv = ops::reshape(ops::linear(h, l.wv, pr, attn16, true), {B, T, Hk, Dh});
      Tensor a = ops::reshape(ops::attention(q, k, vv, ap), {B, T, H * Dh});
      x = residual(a, l.wo, x);
      h = ops::rmsnorm(x, l.ffn_norm, 1e-5f, act16);
      Tensor f =
          ops::swiglu(ops::linear(h, l.w1, pr, act16, true), ops::linear(h, l.w3, pr, act16, true));
      x = residual(f, l.w2, x);
    }
    Tensor h = ops::reshape(ops::rmsnorm(x, final_norm, 1e-5f), {B * T, D});
    ops::CrossEntropyOptions co;
    co.chunk = c.ce_chunk > 0 ? c.ce_chunk : be.cross_entropy_chunk(V);
    co.precision = pr;
    co.n_valid = B * T;  // every target is valid (and nothing is read back)
    Tensor loss = ops::linear_cross_entropy(h, head, tg_t, co);
    x = h = Tensor();
    // Seeded with 1 / accum, as the trainer does: the gradients add up to those of the
    // step's mean loss.
    loss.backward(seed);
    return loss.detach();
  };
  // The step's device work; returns the loss without reading it. dynamic (captured steps):
  // AdamW reads its per-step scalars from there (AdamWParams::dynamic).
  auto body = [&](int64_t step_no, const Tensor& dynamic) {
    std::optional<ops::WeightCopiesScope> scope(std::in_place, &copies);
    Tensor total;  // the sum of the micro-batches' mean losses (step() divides by accum)
    for (int64_t mb = 0; mb < c.accum; ++mb) {
      Tensor loss = micro_batch();
      total = total.defined() ? ops::add(total, loss) : loss;
    }
    scope.reset();
    AdamWParams opt;
    opt.lr = 3e-4f, opt.step = step_no;
    opt.dynamic = dynamic;
    {
      autograd::NoGradGuard ng;
      // As optim::AdamW: one multi-tensor update (LLAMA3_MULTI_TENSOR=0: one per parameter).
      std::vector<AdamWItem> items;
      for (size_t i = 0; i < params.size(); ++i) {
        AdamWItem it;
        it.param = *params[i], it.grad = params[i]->grad(), it.m = m[i], it.v = v[i];
        LLAMA3_CHECK(it.grad.defined(), "parameter {} got no gradient", i);
        if (copy_of[i] >= 0) it.param_bf16 = copies.copy(size_t(copy_of[i]));
        it.weight_decay = 0.1f;
        items.push_back(std::move(it));
      }
      be.adamw_step_many(items, opt);
      for (size_t i = 0; i < params.size(); ++i) {
        if (copy_of[i] >= 0) copies.mark_written(size_t(copy_of[i]));
        params[i]->zero_grad();
      }
    }
    return total;
  };
  // --graph: state for AdamW (no clipping here: grad_scale 1, never skipped) and the graph.
  Tensor dyn = c.graph ? Tensor::zeros({AdamWDynamic::size}, DType::f32, dev) : Tensor();
  std::unique_ptr<DeviceGraph> graph;
  Tensor graph_loss;
  bool graph_on = c.graph;
  auto step = [&](int64_t step_no) {
    if (!graph_on || step_no == 1) {  // eager (the graph's warm-up: allocator, GEMM plans)
      Tensor loss = body(step_no, Tensor());
      be.synchronize();
      return loss.item() / double(c.accum);
    }
    AdamWParams opt;
    opt.lr = 3e-4f, opt.weight_decay = 0.1f, opt.step = step_no;
    const AdamWStepScalars sc = adamw_step_scalars(opt);
    const float host[AdamWDynamic::size] = {0.f, 1.f, 0.f, sc.step_size, sc.bc2_sqrt, sc.decay};
    be.copy_from_host(host, sizeof host, dyn);
    if (!graph) graph = be.capture([&] { graph_loss = body(step_no, dyn); });
    graph->replay();
    const double l = graph_loss.item() / double(c.accum);  // synchronises
    be.check_deferred();
    return l;
  };

  const double tokens = double(B * T * c.accum);
  const double model_flops = 6.0 * double(n_matmul) * tokens;
  // Causal attention: QK^T and PV, 2 flops per MAC, half the matrix; x3 for fwd+bwd. (The
  // MFU of record. PaLM's definition, which Megatron-LM, torchtitan and nanoGPT use too, counts
  // the whole matrix, 12 L H Q T a token: mfu_full, printed beside it for comparison with
  // figures reported that way.)
  const double attn_flops = 3.0 * 4.0 * double(c.layers) * double(B * c.accum) * double(T) *
                            double(T) * double(H) * double(Dh) / 2.0;
  double total = 0;
  double loss = 0;
  for (int64_t s = 1; s <= c.warmup + c.steps; ++s) {
    const double ts = now();
    loss = step(s);
    const double dt = now() - ts;
    const bool timed = s > c.warmup;
    if (timed) total += dt;
    fmt::print("step {} loss {:.4f} {:.1f} ms{}\n", s, loss, dt * 1e3, timed ? "" : " (warm-up)");
    std::fflush(stdout);
  }
  const double per = total / double(c.steps);
  const double tps = tokens / per;
  const double mfu = (model_flops + attn_flops) / per / 989e12;
  const double mfu_full = (model_flops + 2.0 * attn_flops) / per / 989e12;
  auto st = be.allocator().stats();
  fmt::print(
      "step {:.1f} ms, {:.0f} tokens/s, {:.1f} TFLOP/s (6N {:.2f} TF + attention {:.2f} TF "
      "per step), MFU {:.1f}% of 989 TFLOP/s ({:.1f}% counting the whole attention matrix, "
      "PaLM's definition); peak device memory {:.1f} GiB\n",
      per * 1e3, tps, (model_flops + attn_flops) / per / 1e12, model_flops / 1e12,
      attn_flops / 1e12, mfu * 100, mfu_full * 100, double(st.peak_in_use) / double(1ull << 30));
  fmt::print(
      "RESULT {}{} seq={} accum={} tokens_per_s={:.0f} mfu={:.4f} mfu_full={:.4f} step_ms={:.1f} "
      "loss={:.4f} after_steps={}\n",
      c.f32_attn_act ? "f32attn_llama3_cuda" : "llama3_cuda", c.graph ? "_graph" : "", T, c.accum,
      tps, mfu, mfu_full, per * 1e3, loss, c.warmup + c.steps);
  if (c.profile && !dev.is_cpu()) {
    graph_on = false;  // per-op times need the eager step's host-side events
    cuda_profile_start(dev.index);
    const double ts = now();
    step(c.warmup + c.steps + 1);
    const double dt = now() - ts;
    fmt::print("profile of one more step ({:.1f} ms wall, events around every backend call):\n{}",
               dt * 1e3, cuda_profile_report(dev.index));
  }
  return std::isfinite(loss) ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Config c = parse(argc, argv);
    if (!c.device.is_cpu() && !cuda_init()) {
      fmt::print("SKIP: no CUDA device (cuda_init() returned false)\n");
      return 77;
    }
    return c.attn_only ? attn_only(c) : c.optimizer_only ? optimizer_only(c) : run(c);
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
}
