#include "text/model/parallelize.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <numeric>
#include <utility>

#include "runtime/autograd/autograd.h"
#include "runtime/dist/comm_ops.h"
#include "text/model/vocab_parallel.h"

namespace llama3::text {

using dist::ReduceOp;

std::pair<int64_t, int64_t> stage_layers(int64_t n_layers, int stage, int stages) {
  // ceil(L / S) per stage; the deficit (<= 2, checked by validate_for_model) is taken first
  // from the last stage (it also runs the head and loss), then from the first (embedding).
  const int64_t per = (n_layers + stages - 1) / stages;
  const int64_t deficit = per * stages - n_layers;
  std::vector<int64_t> count(size_t(stages), per);
  if (deficit >= 1) count.back() -= 1;
  if (deficit >= 2) count.front() -= 1;
  int64_t first = 0;
  for (int s = 0; s < stage; ++s) first += count[size_t(s)];
  return {first, first + count[size_t(stage)]};
}

struct ParallelLlama::Param {
  std::string name;
  Tensor* slot = nullptr;  // the module's tensor: the tp-local weight while materialised
  nn::ParamInfo info;
  Shape full_shape, local_shape;
  int split_dim = -1;  // tp split (0: column-parallel rows, 1: row-parallel columns)
  int64_t layer = -1;  // -1: root unit (embedding, final norm, lm_head)
  bool fsdp = false;
  int64_t local_numel = 0, padded = 0;
  Tensor shard;  // FSDP: (padded / dp_shard) flat slice; else the tp-local tensor itself
};

namespace {
int tp_split_dim(const std::string& name) {
  for (const char* col : {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
    if (name.find(std::string(".") + col + ".") != std::string::npos) return 0;
  for (const char* row : {"o_proj", "down_proj"})
    if (name.find(std::string(".") + row + ".") != std::string::npos) return 1;
  // Vocabulary parallel: rows of the embedding and of the output head.
  if (name.find("embed_tokens.") != std::string::npos || name.rfind("lm_head.", 0) == 0) return 0;
  return -1;
}

int64_t layer_of(const std::string& name) {
  const std::string key = "model.layers.";
  if (name.rfind(key, 0) != 0) return -1;
  return std::stoll(name.substr(key.size()));
}

void accumulate(Tensor& leaf, const Tensor& g) {
  Tensor cur = leaf.grad();
  if (!cur.defined())
    leaf.set_grad(g);
  else
    backend_for(g.device()).axpy(1.f, g, cur);
}

// A scalar for a collective: on the model's device, since the NCCL communicator reduces
// device memory only (the CUDA kernels have no f64 arithmetic; these are only copied).
Tensor tensor_f64(double v, Device d) {
  return Tensor::from_vector(std::vector<double>{v}, {1}, d);
}

// A host copy of t that shares no storage with it (distributed checkpoints, gathered state).
Tensor host_copy(const Tensor& t) {
  return t.device().is_cpu() ? t.contiguous().clone() : t.to(Device::cpu());
}
}  // namespace


ParallelLlama::ParallelLlama(LlamaModel& model, dist::ProcessGroups groups, ParallelizeOptions opt)
    : model_(model), g_(std::move(groups)), opt_(opt) {
  const auto& d = g_.dims;
  // Every buffer and transfer of the step lives on the device of the model's parameters.
  {
    auto nps = model.named_parameters();
    LLAMA3_CHECK(!nps.empty() && nps.front().tensor->defined(),
                 "parallelize: the model has no parameters");
    dev_ = nps.front().tensor->device();
    for (auto& np : nps)
      LLAMA3_CHECK(np.tensor->device() == dev_,
                   "parallelize: {} is on {}, {} on {}: move the model to one device",
                   nps.front().name, dev_.str(), np.name, np.tensor->device().str());
  }
  const LlamaConfig& c = model.config();
  dist::ModelShape ms;
  ms.n_heads = c.n_heads, ms.n_kv_heads = c.n_kv_heads, ms.n_layers = c.n_layers, ms.ffn_hidden = c.ffn_hidden();
  ms.vocab = c.vocab_size, ms.microbatches = opt.microbatches, ms.virtual_stages = opt.virtual_stages;
  dist::validate_for_model(d, ms);

  const int stage = g_.coords.pp, stages = d.pp, V = opt.virtual_stages;
  for (int k = 0; k < V; ++k) chunks_.push_back(stage_layers(c.n_layers, k * stages + stage, stages * V));
  block_params_.resize(size_t(c.n_layers));
  auto owns_layer = [&](int64_t l) {
    for (auto [a, b] : chunks_)
      if (l >= a && l < b) return true;
    return false;
  };
  const int tp_r = g_.coords.tp, ds = d.dp_shard, ds_r = g_.coords.dp_shard;

  // 1. TP: communication around the column/row-parallel projections of this stage's blocks.
  if (d.tp > 1) {
    auto tp = g_.tp;
    auto copy_in = [tp](const Tensor& x) { return dist::copy_to_group(x, *tp); };
    auto reduce_out = [tp](const Tensor& y) { return dist::reduce_from_group(y, *tp); };
    // Overlap: the all-reduce of a column-parallel layer's input gradient is issued inside
    // its backward right after dX and completed after the dW GEMM (Megatron's asynchronous
    // input-gradient all-reduce). It is copy_to_group's all-reduce, of the same dX, at the
    // same point of the collective sequence (copy_to_group's node runs right after the
    // linear's), so the values are bitwise those of the blocking path.
    // OpenMPI advances the all-reduce only inside MPI calls, so the dW GEMM is run in slices
    // with MPI_Test (Work::test) between them.
    ops::DxHook reduce_dx = [tp](Tensor& dx) {
      std::shared_ptr<dist::Work> w = tp->iall_reduce(dx, ReduceOp::sum);
      ops::DxPending p;
      p.progress = [w] { w->test(); };
      p.finish = [w] { w->wait(); };
      return p;
    };
    // Overlap of the row-parallel layers' forward all-reduce (o, down): their GEMM runs in
    // slices of rows (tokens) and each slice's partial output is all-reduced in place while
    // the next slice is computed (ops::linear's out_hook), then all are waited before the
    // layer returns; reduced_from_group adds reduce_from_group's identity-backward node
    // without communicating. Per element it is the same sum over the same tp ranks: MPI
    // issues every all-reduce as MPI_Iallreduce in place, for which OpenMPI 4.1's libnbc
    // always takes its binomial tree (in place or < 4 ranks), whose per-element order does
    // not depend on the message length; for 2 ranks a + b = b + a anyway. So the values are
    // bitwise those of the blocking path. The backward has no collective (identity).
    ops::OutHook reduce_rows = [tp](Tensor& rows) {
      std::shared_ptr<dist::Work> w = tp->iall_reduce(rows, ReduceOp::sum);
      ops::DxPending p;
      p.progress = [w] { w->test(); };
      p.finish = [w] { w->wait(); };
      return p;
    };
    auto reduced_out = [tp](const Tensor& y) { return dist::reduced_from_group(y, *tp); };
    for (int64_t l = 0; l < c.n_layers; ++l) {
      if (!owns_layer(l)) continue;
      Block& b = *model.blocks()[size_t(l)];
      for (nn::Linear* lin : {&b.self_attn.q_proj, &b.self_attn.k_proj, &b.self_attn.v_proj,
                              &b.mlp.gate_proj, &b.mlp.up_proj}) {
        if (opt.overlap && opt.tp_overlap)
          lin->dx_hook = reduce_dx;
        else
          lin->input_hook = copy_in;
      }
      for (nn::Linear* lin : {&b.self_attn.o_proj, &b.mlp.down_proj}) {
        if (opt.overlap && opt.tp_overlap && opt.tp_forward_overlap) {
          lin->out_hook = reduce_rows;
          lin->output_hook = reduced_out;
        } else {
          lin->output_hook = reduce_out;
        }
      }
    }
  }

  // CP: every block's keys and values are gathered over the cp group (queries stay local).
  if (d.cp > 1) {
    auto cp = g_.cp;
    for (int64_t l = 0; l < c.n_layers; ++l)
      if (owns_layer(l)) {
        Attention& a = model.blocks()[size_t(l)]->self_attn;
        if (opt.overlap)  // V's gather runs while K and Q are projected, K's while Q is
          a.kv_hook_async = [cp, early = opt.cp_backward_overlap](const Tensor& x) {
            return dist::gather_sequence_async(x, *cp, early);
          };
        else
          a.kv_hook = [cp](const Tensor& x) { return dist::gather_sequence(x, *cp); };
      }
  }

  for (auto& np : model.named_parameters()) {
    auto p = std::make_unique<Param>();
    p->name = np.name;
    p->slot = np.tensor;
    p->info = np.info;
    p->full_shape = np.tensor->shape();
    p->layer = layer_of(np.name);
    // 2. PP: keep only this stage's parameters.
    bool owned;
    if (p->layer >= 0)
      owned = owns_layer(p->layer);
    else if (np.name.find("embed_tokens") != std::string::npos)
      owned = stage == 0;
    else
      owned = stage == stages - 1;  // final norm, lm_head
    if (!owned) {
      *np.tensor = Tensor();
      continue;
    }
    // 1. TP slice.
    Tensor local = np.tensor->detach();
    if (d.tp > 1) {
      p->split_dim = tp_split_dim(np.name);
      if (p->split_dim >= 0) {
        const int64_t n = local.size(p->split_dim) / d.tp;
        local = local.narrow(p->split_dim, tp_r * n, n);
      }
    }
    local = local.contiguous().clone();
    p->local_shape = local.shape();
    p->local_numel = local.numel();
    // 4. FSDP shard (3. activation checkpointing is applied per block in run_blocks).
    p->fsdp = ds > 1;
    if (p->fsdp) {
      p->padded = (p->local_numel + ds - 1) / ds * ds;
      const int64_t n = p->padded / ds;
      Tensor flat = Tensor::zeros({p->padded}, local.dtype(), local.device());
      flat.narrow(0, 0, p->local_numel).copy_(local.view({p->local_numel}));
      p->shard = flat.narrow(0, ds_r * n, n).contiguous().clone();
      *np.tensor = Tensor();  // resharded until gathered
    } else {
      p->shard = local;
      *np.tensor = p->shard;  // shares the autograd meta: gradients land on the shard
    }
    p->shard.set_requires_grad(np.info.trainable);
    if (!p->fsdp) *np.tensor = p->shard;
    if (p->layer >= 0)
      block_params_[size_t(p->layer)].push_back(p.get());
    else
      root_params_.push_back(p.get());
    params_.push_back(std::move(p));
  }
  if (opt_.verbose && g_.world->rank() == 0 && d.pp > 1)
    spdlog::info("pipeline: {}, {} ranks x {} chunks, {} micro-batches, bubble fraction (S-1)/(V*M+S-1) = {:.3f}",
                 V > 1 ? "interleaved 1F1B" : "1F1B", d.pp, V, opt_.microbatches, bubble_fraction());
}

ParallelLlama::~ParallelLlama() = default;

double ParallelLlama::bubble_fraction() const {
  const double S = g_.dims.pp, M = double(opt_.microbatches), V = opt_.virtual_stages;
  return (S - 1) / (V * M + S - 1);
}

void ParallelLlama::install(Param& p, const Tensor& full) {
  Tensor t = full.narrow(0, 0, p.local_numel).view(p.local_shape).detach();
  t.set_requires_grad(p.info.trainable);
  if (p.info.trainable && p.layer >= 0) {
    // Reduce-scatter the full gradient as soon as it is accumulated, then drop it.
    Param* pp = &p;
    t.mutable_meta()->post_accumulate_hooks.push_back([this, pp](Tensor& g) { reduce_scatter_grad(*pp, g); });
  }
  *p.slot = t;
}

void ParallelLlama::gather(Param& p) {
  if (!p.fsdp) return;
  Tensor full = Tensor::empty({p.padded}, p.shard.dtype(), p.shard.device());
  g_.dp_shard->all_gather(p.shard.detach(), full);
  install(p, full);
}

ParallelLlama::Gathering ParallelLlama::issue_gather(const std::vector<Param*>& ps, int64_t layer) {
  Gathering gt;
  gt.layer = layer;
  for (Param* p : ps) {
    if (!p->fsdp) continue;
    Tensor full = Tensor::empty({p->padded}, p->shard.dtype(), p->shard.device());
    gt.works.push_back(g_.dp_shard->iall_gather(p->shard.detach(), full));
    gt.params.push_back(p);
    gt.full.push_back(full);
  }
  return gt;
}

void ParallelLlama::complete(Gathering& gt) {
  for (size_t i = 0; i < gt.params.size(); ++i) {
    gt.works[i]->wait();
    install(*gt.params[i], gt.full[i]);
  }
  gt = Gathering();
}

void ParallelLlama::prefetch(int64_t layer) {
  // One block ahead at most: with the running block that bounds the gathered weights to two
  // blocks. The shards do not change within a step, so a prefetch used later is still valid.
  if (!prefetched_.empty()) return;
  prefetched_.push_back(issue_gather(block_params_[size_t(layer)], layer));
}

void ParallelLlama::materialize(int64_t layer) {
  for (auto it = prefetched_.begin(); it != prefetched_.end(); ++it)
    if (it->layer == layer) {
      Gathering gt = std::move(*it);
      prefetched_.erase(it);
      complete(gt);
      return;
    }
  for (Param* p : block_params_[size_t(layer)]) gather(*p);
}

void ParallelLlama::reduce_scatter_grad(Param& p, Tensor& g) {
  PendingGrad pg;
  pg.layer = p.layer;
  pg.param = &p;
  pg.flat = Tensor::zeros({p.padded}, g.dtype(), g.device());
  pg.flat.narrow(0, 0, p.local_numel).copy_(g.contiguous().view({p.local_numel}));
  pg.part = Tensor::empty({p.padded / g_.dims.dp_shard}, g.dtype(), g.device());
  g = Tensor();
  if (!opt_.overlap) {
    g_.dp_shard->reduce_scatter(pg.flat, pg.part, ReduceOp::sum);
    accumulate(p.shard, pg.part);
    return;
  }
  // Bound the memory in flight: this block's and one earlier block's reduce-scatters.
  if (!pending_grads_.empty() && pending_grads_.back().layer != p.layer) {
    std::vector<int64_t> layers;
    for (auto& q : pending_grads_)
      if (layers.empty() || layers.back() != q.layer) layers.push_back(q.layer);
    if (layers.size() >= 2) finish_grads(1);
  }
  pg.work = g_.dp_shard->ireduce_scatter(pg.flat, pg.part, ReduceOp::sum);
  pending_grads_.push_back(std::move(pg));
}

void ParallelLlama::finish_grads(size_t keep_layers) {
  // Complete the oldest reduce-scatters in issue order (so each shard gradient is summed in
  // the blocking path's order) until at most `keep_layers` blocks remain in flight.
  auto layers_in_flight = [&] {
    size_t n = 0;
    int64_t last = -2;
    for (auto& q : pending_grads_)
      if (q.layer != last) ++n, last = q.layer;
    return n;
  };
  while (!pending_grads_.empty() && layers_in_flight() > keep_layers) {
    PendingGrad pg = std::move(pending_grads_.front());
    pending_grads_.pop_front();
    pg.work->wait();
    accumulate(pg.param->shard, pg.part);
  }
}

void ParallelLlama::progress() {
  // OpenMPI advances nonblocking collectives only inside MPI calls: poke them at every block
  // boundary so they progress while the block computes.
  for (auto& gt : prefetched_)
    for (auto& w : gt.works) w->test();
  for (auto& pg : pending_grads_) pg.work->test();
  for (dist::Work* w : p2p_) w->test();  // pipeline receives posted ahead, sends in flight
}

void ParallelLlama::drain() {
  finish_grads(0);
  for (auto& gt : prefetched_)
    for (auto& w : gt.works) w->wait();  // an unused prefetch: complete it, then drop it
  prefetched_.clear();
}

void ParallelLlama::reshard(Param& p) {
  if (p.fsdp) *p.slot = Tensor();
}

Tensor ParallelLlama::run_blocks(int chunk, Tensor h, const Tensor& pos, const AttentionParams& ap) {
  const ops::Precision prec = model_.options().precision;
  const Tensor inv = model_.inv_freq();
  const bool fsdp = g_.dims.fsdp_enabled();
  const auto [first, end] = chunks_[size_t(chunk)];
  for (int64_t l = first; l < end; ++l) {
    Block* b = model_.blocks()[size_t(l)];
    auto* ps = &block_params_[size_t(l)];
    // The first call is the forward, a second one the recompute in backward (reverse order).
    auto calls = std::make_shared<int>(0);
    auto fn = [this, b, ps, inv, pos, ap, prec, fsdp, l, first, end, calls](const std::vector<Tensor>& in) {
      const bool recompute = (*calls)++ > 0;
      if (opt_.overlap) progress();
      if (fsdp) {
        materialize(l);
        if (opt_.overlap) {
          // Next block to run: l+1 in forward; l-1 in the recompute. The last block's
          // forward prefetches its own recompute (the loss / next stage runs meanwhile).
          int64_t next = recompute ? l - 1 : l + 1;
          if (!recompute && next == end && training_) next = l;
          if (next >= first && next < end) prefetch(next);
        }
      }
      Tensor y = (*b)(in[0], inv, pos, ap, prec);
      if (fsdp)
        for (Param* p : *ps) reshard(*p);
      return y;
    };
    if (fsdp || opt_.activation_checkpointing)
      h = autograd::checkpoint(fn, {h});
    else
      h = fn({h});
  }
  return h;
}

void ParallelLlama::set_microbatches(int64_t m) {
  const LlamaConfig& c = model_.config();
  dist::ModelShape ms;
  ms.n_heads = c.n_heads, ms.n_kv_heads = c.n_kv_heads, ms.n_layers = c.n_layers, ms.ffn_hidden = c.ffn_hidden();
  ms.vocab = c.vocab_size, ms.microbatches = m, ms.virtual_stages = opt_.virtual_stages;
  dist::validate_for_model(g_.dims, ms);
  opt_.microbatches = m;
}

double ParallelLlama::forward_backward(const Tensor& tokens, const Tensor& targets, const Tensor& doc_ids) {
  return run_step(tokens, targets, doc_ids, true);
}

double ParallelLlama::forward_loss(const Tensor& tokens, const Tensor& targets, const Tensor& doc_ids) {
  autograd::NoGradGuard ng;
  return run_step(tokens, targets, doc_ids, false);
}

double ParallelLlama::run_step(const Tensor& tokens, const Tensor& targets, const Tensor& doc_ids, bool train) {
  LLAMA3_CHECK(tokens.dim() == 2 && targets.shape() == tokens.shape(), "parallel step: tokens {} / targets {}",
               tokens.str(), targets.str());
  const int64_t B = tokens.size(0), Tfull = tokens.size(1), M = opt_.microbatches, D = model_.config().dim;
  LLAMA3_CHECK(B % M == 0, "parallel step: local batch {} is not divisible by micro-batches {}", B, M);
  const int64_t Bm = B / M;
  const int S = g_.dims.pp, s = g_.coords.pp, cp = g_.dims.cp, V = opt_.virtual_stages;
  const int next_rank = (s + 1) % S, prev_rank = (s + S - 1) % S;
  LLAMA3_CHECK(Tfull % (2 * cp) == 0, "parallel step: seq {} is not divisible by 2 x cp {} = {}", Tfull, cp, 2 * cp);

  // CP: this rank's tokens are its two load-balanced chunks; keys keep global positions.
  const std::vector<int32_t> pv = dist::cp_positions(Tfull, cp, g_.coords.cp);
  const int64_t T = int64_t(pv.size());
  auto take_columns = [&](const Tensor& t) {
    if (cp == 1) return t.contiguous();
    std::vector<int32_t> all = t.contiguous().to_vector<int32_t>(), out(size_t(B * T));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < T; ++i) out[size_t(b * T + i)] = all[size_t(b * Tfull + pv[size_t(i)])];
    return Tensor::from_vector(out, {B, T});
  };
  // The ids go to the model's device once; the valid-target counts are host arithmetic on a
  // host copy of the targets (the one device -> host copy of the step's inputs).
  const Tensor targets_c = take_columns(targets);
  const Tensor tokens_l = take_columns(tokens).to(dev_), targets_l = targets_c.to(dev_);
  const Tensor docs_d = doc_ids.defined() ? doc_ids.to(dev_) : Tensor();

  // Valid targets per micro-batch and over the global batch (the loss normaliser).
  std::vector<int32_t> tv = targets_c.to_vector<int32_t>();
  std::vector<double> mb_valid(static_cast<size_t>(M), 0.0);
  for (int64_t i = 0; i < int64_t(tv.size()); ++i)
    if (tv[size_t(i)] >= 0) mb_valid[size_t(i / (Bm * T))] += 1;
  Tensor cnt = tensor_f64(std::accumulate(mb_valid.begin(), mb_valid.end(), 0.0), dev_);
  g_.dp->all_reduce(cnt, ReduceOp::sum);
  g_.cp->all_reduce(cnt, ReduceOp::sum);
  const double n_global = cnt.item();
  LLAMA3_CHECK(n_global > 0, "parallel step: the global batch has no valid targets");

  training_ = train;
  if (opt_.overlap && g_.dims.fsdp_enabled()) {
    // The root unit's gather and the first block's run together.
    Gathering root = issue_gather(root_params_, -1);
    if (chunks_[0].second > chunks_[0].first) prefetch(chunks_[0].first);
    complete(root);
  } else {
    for (Param* p : root_params_) gather(*p);
  }
  const Tensor pos = Tensor::from_vector(pv, {T}, dev_);

  struct Mb {
    Tensor input, output, loss;
  };
  std::vector<Mb> mbs(static_cast<size_t>(M * V));  // by (chunk, micro-batch)
  double loss_sum = 0;

  // This rank's schedule as a list of operations cut into units (the operations between two
  // communication points), so that the transfers of each point can be issued together.
  // 1F1B: (S - s - 1) warm-up forwards, then one forward / one backward, then cool-down.
  // Interleaved (Megatron): the n-th forward runs chunk (n / S) % V on micro-batch
  // (n / (S V)) S + n % S, backwards walk the chunks in reverse; warm-up 2(S - s - 1) + (V - 1) S.
  // Evaluation: forwards only, in the schedule's forward order on every rank (a stage's
  // input was sent by a forward that comes earlier in the same order: no deadlock).
  struct Op {
    bool fwd;
    int k;
    int64_t i;
  };
  const int64_t total = M * V;
  auto fwd_k = [&](int64_t n) { return int((n / S) % V); };
  auto bwd_k = [&](int64_t n) { return V - 1 - int((n / S) % V); };
  auto mb_of = [&](int64_t n) { return (n / (int64_t(S) * V)) * S + n % S; };
  std::vector<Op> ops;
  std::vector<size_t> unit_start;  // first operation of each unit; ops.size() closes the last
  const bool pair_steady = V > 1 && g_.pp->p2p_in_order();
  if (!train) {
    for (int64_t n = 0; n < total; ++n)
      unit_start.push_back(ops.size()), ops.push_back({true, fwd_k(n), mb_of(n)});
  } else {
    const int64_t warmup = std::min<int64_t>(
        total, V == 1 ? S - s - 1 : int64_t(2) * (S - s - 1) + int64_t(V - 1) * S);
    for (int64_t n = 0; n < warmup; ++n)
      unit_start.push_back(ops.size()), ops.push_back({true, fwd_k(n), mb_of(n)});
    for (int64_t n = 0; n < total - warmup; ++n) {
      // Interleaved steady state under NCCL's semantics: the forward and backward of one step
      // form one unit (as in Megatron): with a communication point between them, ranks wait
      // on one another in a cycle. 1F1B communicates after each (Megatron's
      // send_forward_recv_backward / send_backward_recv_forward), and so does MPI, whose
      // transfers do not wait for one another (a forward's send is not held back).
      unit_start.push_back(ops.size());
      ops.push_back({true, fwd_k(warmup + n), mb_of(warmup + n)});
      if (!pair_steady) unit_start.push_back(ops.size());
      ops.push_back({false, bwd_k(n), mb_of(n)});
    }
    for (int64_t n = total - warmup; n < total; ++n)
      unit_start.push_back(ops.size()), ops.push_back({false, bwd_k(n), mb_of(n)});
  }
  unit_start.push_back(ops.size());

  // Point-to-point. Global stage of local chunk k is k*S + s; tags name (receiving stage,
  // micro-batch, direction). A forward of a stage > 0 receives its input activation from
  // the previous rank, a backward of a stage < last its output gradient from the next rank.
  // Before each unit one batch_p2p call issues the sends of the previous unit and the
  // receives of this one. Under NCCL's semantics (Communicator::p2p_in_order: transfers
  // matched in issue order, each batch completing only when its peers have posted the
  // matching transfers) this order is free of deadlock: every rank issues its transfers to a
  // peer in the order the peer receives them, and no batch waits for a transfer that its peer
  // issues only after a batch that waits for this rank (checked for S 2..8, V 1..4, M 1..16 by
  // a model of these semantics, tests/integration/pp_nccl_schedule_model.py, and on MPI under
  // LLAMA3_P2P_EMULATE_NCCL by tests/integration/test_parallel_nccl_order.sh).
  // A batch's receives are waited where their data is consumed, its sends once completed
  // (NCCL: the batch runs on the communicator's stream while the compute stream goes on).
  // With opt_.overlap on other communicators (MPI) the batch also posts the receives of the
  // next kRecvAhead operations (polled at block boundaries, progress()), so that their data
  // arrives while this unit computes. Every send keeps its buffer (a fresh tensor, or the
  // detached output) until it completes.
  constexpr size_t kRecvAhead = 2;
  const bool recv_ahead = opt_.overlap && !g_.pp->p2p_in_order();
  auto tag = [&](int64_t stage, int64_t i, int dir) { return int((stage * M + i) * 2 + dir); };
  const int64_t last_stage = int64_t(S) * V - 1;
  struct Recv {
    Tensor buf;
    std::unique_ptr<dist::Work> work;
  };
  std::vector<Recv> recvs(ops.size());
  struct Send {
    Tensor buf;
    std::unique_ptr<dist::Work> work;
  };
  std::deque<Send> sends;
  std::vector<dist::P2POp> to_send;  // produced by the current unit, issued with the next batch
  struct ClearP2p {  // progress() must not see this step's handles once they are gone
    std::vector<dist::Work*>& v;
    ~ClearP2p() { v.clear(); }
  } clear_p2p{p2p_};
  // The receive of operation j, unless it has none or it is posted already.
  auto recv_op = [&](size_t j, std::vector<dist::P2POp>& batch, std::vector<size_t>& slots) {
    if (j >= ops.size() || recvs[j].buf.defined()) return;
    const Op& op = ops[j];
    const int64_t stage = int64_t(op.k) * S + s;
    if (op.fwd ? stage == 0 : stage == last_stage) return;
    recvs[j].buf = Tensor::empty({Bm, T, D}, DType::f32, dev_);
    batch.push_back({dist::P2POp::Kind::recv, recvs[j].buf, op.fwd ? prev_rank : next_rank,
                     tag(stage, op.i, op.fwd ? 0 : 1)});
    slots.push_back(j);
  };
  auto issue_batch = [&](size_t unit) {
    std::vector<dist::P2POp> batch = std::move(to_send);
    to_send.clear();
    const size_t n_sends = batch.size();
    std::vector<size_t> slots;  // the operation of each receive in the batch
    if (unit + 1 < unit_start.size()) {
      const size_t first = unit_start[unit], end = unit_start[unit + 1];
      for (size_t j = first; j < end; ++j) recv_op(j, batch, slots);
      if (recv_ahead)
        for (size_t j = end; j <= first + kRecvAhead; ++j) recv_op(j, batch, slots);
    }
    if (batch.empty()) return;
    std::vector<std::unique_ptr<dist::Work>> works = g_.pp->batch_p2p(batch);
    for (size_t b = 0; b < batch.size(); ++b) {
      p2p_.push_back(works[b].get());
      if (b < n_sends)
        sends.push_back({batch[b].tensor, std::move(works[b])});
      else
        recvs[slots[b - n_sends]].work = std::move(works[b]);
    }
  };
  auto take_recv = [&](size_t j) {
    Recv& r = recvs[j];
    LLAMA3_CHECK(r.work, "pipeline: the receive of operation {} was not issued", j);
    r.work->wait();
    std::erase(p2p_, r.work.get());
    r.work.reset();
    return std::exchange(r.buf, Tensor());
  };
  auto send = [&](Tensor buf, int dst, int t) {
    to_send.push_back({dist::P2POp::Kind::send, std::move(buf), dst, t});
  };
  auto retire_sends = [&](bool all) {
    for (auto it = sends.begin(); it != sends.end();) {
      if (all || it->work->test()) {
        it->work->wait();
        std::erase(p2p_, it->work.get());
        it = sends.erase(it);  // the buffer is released with its completed send
      } else {
        ++it;
      }
    }
  };

  auto forward = [&](size_t j) {
    const int k = ops[j].k;
    const int64_t i = ops[j].i;
    Mb& mb = mbs[size_t(k * M + i)];
    const int64_t stage = int64_t(k) * S + s;
    const bool first = stage == 0, last = stage == last_stage;
    AttentionParams ap;
    ap.causal = true;
    // Mixed precision as in LlamaModel::hidden (bf16 attention products; the CPU ignores it).
    if (model_.options().precision == ops::Precision::bf16) ap.compute = AttnCompute::bf16;
    if (docs_d.defined()) ap.doc_ids = docs_d.narrow(0, i * Bm, Bm).contiguous();  // keys: all T
    if (cp > 1) ap.q_pos = pos;
    Tensor h;
    if (first) {
      const Tensor ids = tokens_l.narrow(0, i * Bm, Bm).contiguous();
      h = g_.dims.tp > 1 ? vocab_parallel_embedding(model_.embed_tokens().weight, ids, *g_.tp)
                         : model_.embed_tokens()(ids);
    } else {
      Tensor buf = take_recv(j);
      buf.set_requires_grad(true);
      mb.input = buf;
      h = buf;
    }
    h = run_blocks(k, h, pos, ap);
    if (last) {
      Tensor hn = ops::reshape(model_.norm()(h), {Bm * T, D});
      ops::CrossEntropyOptions o;
      o.chunk = model_.ce_chunk_rows(hn.device());
      o.precision = model_.options().precision;
      const double nv = mb_valid[size_t(i)];
      if (nv > 0) {
        const Tensor tg = targets_l.narrow(0, i * Bm, Bm).contiguous().view({-1});
        Tensor l = g_.dims.tp > 1 ? vocab_parallel_cross_entropy(hn, model_.lm_head().weight, tg,
                                                                 *g_.tp, o.chunk, o.precision)
                                  : ops::linear_cross_entropy(hn, model_.lm_head().weight, tg, o);
        mb.loss = ops::scale(l, float(nv / n_global));
        // The micro-batch loss reaches the host here (a synchronisation on CUDA).
        loss_sum += l.item() * nv / n_global;
      }
    } else {
      if (train) mb.output = h;
      send(h.detach().contiguous(), next_rank, tag(stage + 1, i, 0));
    }
    if (!train) mb.input = mb.loss = Tensor();  // evaluation: nothing is kept for backward
  };
  auto backward = [&](size_t j) {
    const int k = ops[j].k;
    const int64_t i = ops[j].i;
    Mb& mb = mbs[size_t(k * M + i)];
    const int64_t stage = int64_t(k) * S + s;
    const bool first = stage == 0, last = stage == last_stage;
    if (last) {
      if (mb.loss.defined()) mb.loss.backward();
    } else {
      mb.output.backward(take_recv(j));
    }
    if (!first) {
      Tensor gi = mb.input.grad();
      if (!gi.defined()) gi = Tensor::zeros({Bm, T, D}, DType::f32, dev_);
      send(gi.contiguous(), prev_rank, tag(stage - 1, i, 1));
    }
    // Activations of this micro-batch are released here (the send keeps its own buffer).
    mb.input = mb.output = mb.loss = Tensor();
  };

  for (size_t u = 0; u + 1 < unit_start.size(); ++u) {
    issue_batch(u);
    for (size_t j = unit_start[u]; j < unit_start[u + 1]; ++j) {
      if (ops[j].fwd)
        forward(j);
      else
        backward(j);
    }
    if (opt_.overlap) retire_sends(false);
  }
  issue_batch(unit_start.size() - 1);  // the last unit's sends
  retire_sends(true);
  p2p_.clear();
  if (!train) {
    drain();
    for (Param* p : root_params_) reshard(*p);
    Tensor l = tensor_f64(s == S - 1 ? loss_sum : 0.0, dev_);
    g_.dp->all_reduce(l, ReduceOp::sum);
    g_.pp->all_reduce(l, ReduceOp::sum);
    g_.cp->all_reduce(l, ReduceOp::sum);
    return l.item();
  }
  drain();  // every block's gradient is on its shard from here

  // Root unit under FSDP: one reduce-scatter of its accumulated gradients per step.
  std::vector<std::unique_ptr<dist::Work>> works;
  std::vector<std::pair<Param*, Tensor>> root_parts;
  std::vector<Tensor> flats;
  for (Param* p : root_params_) {
    if (p->fsdp && p->info.trainable) {
      Tensor g = p->slot->grad();
      Tensor flat = Tensor::zeros({p->padded}, DType::f32, dev_);
      if (g.defined())
        flat.narrow(0, 0, p->local_numel).copy_(g.contiguous().view({p->local_numel}));
      Tensor part = Tensor::empty({p->padded / g_.dims.dp_shard}, DType::f32, dev_);
      if (opt_.overlap) {
        works.push_back(g_.dp_shard->ireduce_scatter(flat, part, ReduceOp::sum));
        root_parts.emplace_back(p, part);
        flats.push_back(flat);  // the send buffer must outlive the collective
      } else {
        g_.dp_shard->reduce_scatter(flat, part, ReduceOp::sum);
        accumulate(p->shard, part);
      }
    }
  }
  for (size_t i = 0; i < works.size(); ++i) {
    works[i]->wait();
    accumulate(root_parts[i].first->shard, root_parts[i].second);
  }
  works.clear();
  for (Param* p : root_params_) reshard(*p);
  // Replicas (HSDP / plain DP) and cp: sum the shard gradients (issued together when
  // overlapping, so the all-reduces pipeline instead of running one by one).
  for (auto& p : params_) {
    if (!p->info.trainable) continue;
    if (!p->shard.grad().defined())
      p->shard.set_grad(Tensor::zeros(p->shard.shape(), DType::f32, dev_));
    Tensor gr = p->shard.grad();
    if (g_.dims.dp_replicate > 1) {
      if (opt_.overlap)
        works.push_back(g_.dp_replicate->iall_reduce(gr, ReduceOp::sum));
      else
        g_.dp_replicate->all_reduce(gr, ReduceOp::sum);
    }
  }
  for (auto& w : works) w->wait();
  works.clear();
  if (cp > 1)
    for (auto& p : params_) {
      if (!p->info.trainable) continue;
      Tensor gr = p->shard.grad();
      if (opt_.overlap)
        works.push_back(g_.cp->iall_reduce(gr, ReduceOp::sum));
      else
        g_.cp->all_reduce(gr, ReduceOp::sum);
    }
  for (auto& w : works) w->wait();
  Tensor l = tensor_f64(s == S - 1 ? loss_sum : 0.0, dev_);
  g_.dp->all_reduce(l, ReduceOp::sum);
  g_.pp->all_reduce(l, ReduceOp::sum);
  g_.cp->all_reduce(l, ReduceOp::sum);
  return l.item();
}

Tensor ParallelLlama::shard_of(const Param& p, const Tensor& full) const {
  LLAMA3_CHECK(full.shape() == p.full_shape, "parallelize: {} has shape {}, expected {}", p.name,
               shape_str(full.shape()), shape_str(p.full_shape));
  Tensor local = full;
  if (p.split_dim >= 0) {
    const int64_t n = full.size(p.split_dim) / g_.dims.tp;
    local = full.narrow(p.split_dim, g_.coords.tp * n, n);
  }
  // `full` is a host tensor (a checkpoint): the shard is made on the model's device.
  local = local.contiguous().to(DType::f32);
  local = local.device() == dev_ ? local.clone() : local.to(dev_);
  if (!p.fsdp) return local;
  const int ds = g_.dims.dp_shard;
  const int64_t n = p.padded / ds;
  Tensor flat = Tensor::zeros({p.padded}, DType::f32, dev_);
  flat.narrow(0, 0, p.local_numel).copy_(local.view({p.local_numel}));
  return flat.narrow(0, g_.coords.dp_shard * n, n).contiguous().clone();
}

std::vector<dist::Piece> ParallelLlama::checkpoint_pieces(const optim::AdamW* opt) const {
  // One copy of every element: replicas over dp_replicate and cp, and tp-replicated
  // tensors on tp ranks > 0, write nothing.
  std::vector<dist::Piece> out;
  if (g_.coords.dp_replicate != 0 || g_.coords.cp != 0) return out;
  std::map<std::string, Tensor> state;
  if (opt) state = opt->state_tensors();
  for (auto& p : params_) {
    if (p->split_dim < 0 && g_.coords.tp != 0) continue;
    const int64_t n = p->fsdp ? p->padded / g_.dims.dp_shard : p->local_numel;
    const int64_t off = p->fsdp ? g_.coords.dp_shard * n : 0;
    const int64_t valid = std::max<int64_t>(0, std::min(n, p->local_numel - off));
    auto piece = [&](const std::string& name, const Tensor& t) {
      if (valid == 0) return;
      dist::Piece pc;
      pc.name = name;
      pc.full_shape = p->full_shape;
      pc.split_dim = p->split_dim;
      pc.tp_index = p->split_dim >= 0 ? g_.coords.tp : 0;
      pc.tp_size = p->split_dim >= 0 ? g_.dims.tp : 1;
      pc.offset = off;
      pc.data = host_copy(t.detach().contiguous().view({n}).narrow(0, 0, valid));
      out.push_back(pc);
    };
    piece(p->name, p->shard);
    for (const char* pre : {"exp_avg.", "exp_avg_sq."}) {
      auto it = state.find(pre + p->name);
      if (it != state.end()) piece(pre + p->name, it->second);
    }
  }
  return out;
}

void ParallelLlama::load_full(const std::map<std::string, Tensor>& full, optim::AdamW* opt, int64_t step) {
  std::map<std::string, Tensor> moments;
  for (auto& p : params_) {
    auto it = full.find(p->name);
    LLAMA3_CHECK(it != full.end(), "parallelize: checkpoint has no '{}'", p->name);
    autograd::NoGradGuard ng;
    p->shard.detach().copy_(shard_of(*p, it->second));
    for (const char* pre : {"exp_avg.", "exp_avg_sq."}) {
      auto m = full.find(pre + p->name);
      if (m != full.end()) moments[pre + p->name] = shard_of(*p, m->second);
    }
  }
  if (opt && !moments.empty()) opt->load_state(moments, step);
}

std::vector<nn::NamedParam> ParallelLlama::optimizer_params() const {
  std::vector<nn::NamedParam> out;
  for (auto& p : params_) out.push_back({p->name, &p->shard, p->info});
  return out;
}

optim::AdamW::NormReduction ParallelLlama::norm_reduction() const {
  optim::AdamW::NormReduction r;
  const auto& d = g_.dims;
  for (auto& p : params_) {
    if (!p->info.trainable) continue;
    const double copies = double(d.dp_replicate) * d.cp * (p->split_dim < 0 ? d.tp : 1);
    r.weights.push_back(1.0 / copies);
  }
  auto world = g_.world;
  r.sum_all = [world, dev = dev_](double x) {
    Tensor t = tensor_f64(x, dev);
    world->all_reduce(t, ReduceOp::sum);
    return t.item();
  };
  return r;
}

void ParallelLlama::zero_grad() {
  for (auto& p : params_) p->shard.zero_grad();
}

std::map<std::string, Tensor> ParallelLlama::full_state_dict() const {
  std::map<std::string, Tensor> out;
  const auto& d = g_.dims;
  const LlamaConfig& c = model_.config();
  // Every rank walks every parameter name in model order (a fresh tree gives names/shapes).
  std::map<std::string, const Param*> mine;
  for (auto& p : params_) mine[p->name] = p.get();
  const auto shape_model = [&] {
    nn::SkipInitGuard shapes_only;  // its values are never read
    return std::make_unique<LlamaModel>(LlamaConfig(c), 0);
  }();
  for (auto& np : shape_model->named_parameters()) {
    const Shape full_shape = np.tensor->shape();
    const int64_t layer = layer_of(np.name);
    int owner;
    if (layer >= 0) {
      owner = 0;
      const int stages = d.pp * opt_.virtual_stages;
      for (int st = 0; st < stages; ++st) {
        auto [a, b] = stage_layers(c.n_layers, st, stages);
        if (layer >= a && layer < b) owner = st % d.pp;
      }
    } else {
      owner = np.name.find("embed_tokens") != std::string::npos ? 0 : d.pp - 1;
    }
    Tensor full = Tensor::zeros(full_shape, DType::f32, dev_);
    auto it = mine.find(np.name);
    if (it != mine.end()) {
      const Param& p = *it->second;
      Tensor local;
      if (p.fsdp) {
        Tensor all = Tensor::empty({p.padded}, DType::f32, dev_);
        g_.dp_shard->all_gather(p.shard.detach(), all);
        local = all.narrow(0, 0, p.local_numel).view(p.local_shape);
      } else {
        local = p.shard.detach();
      }
      if (p.split_dim >= 0 && d.tp > 1) {
        Shape gs = p.local_shape;
        gs.insert(gs.begin(), d.tp);
        Tensor all = Tensor::empty(gs, DType::f32, dev_);
        g_.tp->all_gather(local.contiguous(), all);
        if (p.split_dim == 0)
          full = all.view(full_shape).clone();
        else
          full = all.transpose(0, 1).contiguous().view(full_shape);
      } else {
        full = local.contiguous().clone();
      }
    }
    if (d.pp > 1) g_.pp->broadcast(full, owner);
    out[np.name] = full.to(Device::cpu());  // collected on the host (checkpoints, comparisons)
  }
  return out;
}

}  // namespace llama3::text
