#include "text/train/trainer.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <filesystem>

#include "runtime/autograd/autograd.h"
#include "runtime/backend/backend.h"
#include "runtime/dist/dist_checkpoint.h"
#include "runtime/io/checkpoint.h"
#include "text/model/parallelize.h"

namespace fs = std::filesystem;

namespace llama3::text {

BatchTensors to_tensors(const data::Batch& b) {
  const Shape s{b.batch_size, b.seq_len};
  LLAMA3_CHECK(int64_t(b.tokens.size()) == b.batch_size * b.seq_len &&
                   b.targets.size() == b.tokens.size(),
               "batch: {} tokens and {} targets for ({}, {})", b.tokens.size(), b.targets.size(),
               b.batch_size, b.seq_len);
  BatchTensors t;
  t.tokens = Tensor::from_vector(b.tokens, s);
  t.targets = Tensor::from_vector(b.targets, s);
  if (!b.doc_ids.empty()) t.doc_ids = Tensor::from_vector(b.doc_ids, s);
  return t;
}

// The device buffers and graph of a captured step (TrainerConfig::cuda_graph).
struct Trainer::CapturedStep {
  std::string key;                   // the step layout it was captured for
  std::vector<BatchTensors> inputs;  // per micro-batch: the device inputs every replay reads
  std::vector<Tensor> losses;        // per micro-batch: the loss every replay writes
  Tensor state;                      // AdamWDynamic: clip factor, skip flag, lr scalars
  Tensor seed;                       // the backward's seed, 1 / micro-batches
  // Declared last, destroyed first: every buffer the replays read (above, and those the
  // graph's pool holds) outlives the graph.
  std::unique_ptr<DeviceGraph> graph;
};

Trainer::Trainer(LlamaModel& model, const TrainerConfig& cfg, BatchSource& train, BatchSource* eval)
    : model_(model), cfg_(cfg), train_(train), eval_(eval) {
  LLAMA3_CHECK(cfg_.grad_accum >= 1, "trainer: grad_accum {} must be >= 1", cfg_.grad_accum);
  if (eval_) eval_start_ = eval_->state();
  const TrainerParallel& tp = cfg_.parallel;
  if (!tp.enabled()) {
    opt_ = std::make_unique<optim::AdamW>(model.named_parameters(), cfg.adamw);
    return;
  }
  LLAMA3_CHECK(tp.microbatches >= 1, "trainer: pipeline micro-batches {} must be >= 1", tp.microbatches);
  tp.dims.validate(tp.world->size());
  ParallelizeOptions po;
  po.microbatches = cfg_.grad_accum * tp.microbatches;
  po.virtual_stages = tp.virtual_stages;
  po.overlap = tp.overlap;
  po.activation_checkpointing = model.options().activation_checkpointing;
  par_ = std::make_unique<ParallelLlama>(model, dist::make_process_groups(tp.dims, tp.world), po);
  opt_ = std::make_unique<optim::AdamW>(par_->optimizer_params(), cfg.adamw);
  opt_->set_norm_reduction(par_->norm_reduction());
}

Trainer::~Trainer() = default;

int Trainer::rank() const { return par_ ? par_->groups().world->rank() : 0; }

void Trainer::set_grad_accum(int64_t n) {
  LLAMA3_CHECK(n >= 1, "trainer: grad_accum {} must be >= 1", n);
  cfg_.grad_accum = n;
}

BatchTensors Trainer::local_rows(const std::vector<data::Batch>& batches) const {
  const int dp = par_->groups().dp->size(), dp_r = par_->groups().dp->rank();
  const int64_t k = cfg_.parallel.microbatches;
  const int64_t B = batches.front().batch_size, T = batches.front().seq_len;
  LLAMA3_CHECK(B % (int64_t(dp) * k) == 0,
               "trainer: a micro-batch of {} rows is not divisible by dp {} x pipeline micro-batches {} = {}", B, dp,
               k, int64_t(dp) * k);
  const int64_t rows = B / dp;
  std::vector<int32_t> tok, tgt, doc;
  const bool docs = !batches.front().doc_ids.empty();
  for (const data::Batch& b : batches) {
    LLAMA3_CHECK(b.batch_size == B && b.seq_len == T, "trainer: micro-batches of one step differ: ({}, {}) vs ({}, {})",
                 b.batch_size, b.seq_len, B, T);
    const size_t from = size_t(dp_r * rows * T), n = size_t(rows * T);
    tok.insert(tok.end(), b.tokens.begin() + from, b.tokens.begin() + from + n);
    tgt.insert(tgt.end(), b.targets.begin() + from, b.targets.begin() + from + n);
    if (docs) doc.insert(doc.end(), b.doc_ids.begin() + from, b.doc_ids.begin() + from + n);
  }
  const Shape s{rows * int64_t(batches.size()), T};
  BatchTensors out;
  out.tokens = Tensor::from_vector(tok, s);
  out.targets = Tensor::from_vector(tgt, s);
  if (docs) out.doc_ids = Tensor::from_vector(doc, s);
  return out;
}

StepStats Trainer::parallel_step(float lr) {
  // The step's global batch is grad_accum micro-batches; this rank takes its dp rows of
  // each, and ParallelLlama runs them as grad_accum x k pipeline micro-batches. The loss
  // is the mean over all targets of the global batch, which equals the single-process mean
  // of micro-batch means when every micro-batch has as many targets >= 0 (no padding or
  // answer-only documents).
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<data::Batch> batches;
  for (int64_t m = 0; m < cfg_.grad_accum; ++m) batches.push_back(train_.next());
  const BatchTensors bt = local_rows(batches);
  const int64_t want = cfg_.grad_accum * cfg_.parallel.microbatches;
  if (par_->microbatches() != want) par_->set_microbatches(want);
  StepStats st;
  st.loss = par_->forward_backward(bt.tokens, bt.targets, bt.doc_ids);
  // Skip or step on every rank alike: a rank whose shard is non-finite tells the others.
  // The global gradient norm (a collective over every rank's shards) is non-finite when any
  // gradient element is, so it is the gradient check; the flag carries the loss's.
  const double norm = opt_->grad_norm();
  double bad = std::isfinite(st.loss) && std::isfinite(norm) ? 0.0 : 1.0;
  Tensor flag =
      Tensor::from_vector(std::vector<double>{bad}, {1}, par_->device());  // NCCL: device memory
  par_->groups().world->all_reduce(flag, dist::ReduceOp::max);
  st.lr = lr;
  if (flag.item() == 0) {
    st.grad_norm = opt_->step(lr, norm);
  } else {
    st.skipped = true;
    ++skipped_;
    if (rank() == 0)
      spdlog::warn("step {}: non-finite loss or gradient (loss {}); update skipped ({} so far)", step_ + 1, st.loss,
                   skipped_);
  }
  opt_->zero_grad();
  const int64_t tokens = cfg_.grad_accum * batches.front().batch_size * batches.front().seq_len;
  ++step_;
  tokens_ += tokens;
  st.step = step_;
  st.total = cfg_.steps;
  st.tokens = tokens_;
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  st.tokens_per_s = double(tokens) / st.seconds;
  st.flops_per_s = model_.config().flops_per_token(batches.front().seq_len) * double(tokens) / st.seconds;
  return st;
}

bool Trainer::graph_step(const std::vector<data::Batch>& batches, float lr, StepStats& st) {
  if (!cfg_.cuda_graph) return false;
  const Device dev = model_.embed_tokens().weight.device();
  if (dev.is_cpu()) return false;
  // The layout: what the captured host code decided on (shapes, document masks, whether the
  // GEMMs read the bf16 copies). The number of targets each loss divides by is not part of
  // it: the captured cross-entropy counts them on the device at every replay.
  const ops::WeightCopyTable* copies = opt_->bf16_copies();
  std::string key = fmt::format("copies {}", copies ? copies->written() : 0);
  for (const data::Batch& b : batches) {
    int64_t n = 0;
    for (int32_t t : b.targets) n += t >= 0;
    if (n == 0) return false;  // the eager step reports it
    key += fmt::format(" ({}, {}, {})", b.batch_size, b.seq_len, b.doc_ids.empty() ? 0 : 1);
  }
  if (!graph_ || graph_->key != key) {
    graph_.reset();
    // The first step of a layout runs eagerly: it sizes the allocator's cache, plans the GEMMs
    // and writes the bf16 copies, so that the capture needs no first-time work.
    if (warm_key_ != key) {
      warm_key_ = key;
      return false;
    }
    auto cs = std::make_unique<CapturedStep>();
    cs->key = key;
    for (const data::Batch& b : batches) {
      BatchTensors in;
      in.tokens = Tensor::empty({b.batch_size, b.seq_len}, DType::i32, dev);
      in.targets = Tensor::empty({b.batch_size, b.seq_len}, DType::i32, dev);
      if (!b.doc_ids.empty()) in.doc_ids = Tensor::empty({b.batch_size, b.seq_len}, DType::i32, dev);
      cs->inputs.push_back(in);
    }
    cs->state = Tensor::zeros({AdamWDynamic::size}, DType::f32, dev);
    // Made before the capture and kept with the graph: a replay reads it at its address.
    cs->seed = Tensor::full({1}, 1.0 / double(cfg_.grad_accum), DType::f32, dev);
    Backend& be = backend_for(dev);
    opt_->zero_grad();
    try {
      cs->graph = be.capture([&] {
        Tensor total;
        for (size_t m = 0; m < batches.size(); ++m) {
          const BatchTensors& in = cs->inputs[m];
          // (f32, counting its targets on the device: ops::linear_cross_entropy under a capture)
          Tensor loss = model_.loss(in.tokens, in.targets, in.doc_ids);
          cs->losses.push_back(loss.detach());
          if (total.defined()) {
            Tensor sum = Tensor::empty({1}, DType::f32, dev);
            be.add(total, cs->losses.back(), sum);
            total = sum;
          } else {
            total = cs->losses.back();
          }
          loss.backward(cs->seed);
        }
        opt_->enqueue_captured_step(total, cs->state);
      });
    } catch (const std::exception& e) {
      // Not capturable (an op read back to the host, or the device refused): the run goes on
      // eagerly, with this step's partial gradients dropped.
      opt_->zero_grad();
      cfg_.cuda_graph = false;
      spdlog::warn("step {}: the training step could not be captured as a CUDA graph; training "
                   "on without graphs: {}",
                   step_ + 1, e.what());
      return false;
    }
    // The gradients stay the graph's (its replays write and read them); the parameters
    // drop them as after any step.
    opt_->zero_grad();
    graph_ = std::move(cs);
    spdlog::info("step {}: captured the training step as a CUDA graph ({} micro-batches of ({}, {})); "
                 "replaying it while batches keep this layout",
                 step_ + 1, batches.size(), batches.front().batch_size, batches.front().seq_len);
  }
  CapturedStep& cs = *graph_;
  Backend& be = backend_for(dev);
  for (size_t m = 0; m < batches.size(); ++m) {
    const data::Batch& b = batches[m];
    const size_t bytes = b.tokens.size() * sizeof(int32_t);
    be.copy_from_host(b.tokens.data(), bytes, cs.inputs[m].tokens);
    be.copy_from_host(b.targets.data(), bytes, cs.inputs[m].targets);
    if (!b.doc_ids.empty()) be.copy_from_host(b.doc_ids.data(), bytes, cs.inputs[m].doc_ids);
  }
  opt_->set_captured_lr(cs.state, lr);
  cs.graph->replay();
  double loss_sum = 0;
  for (const Tensor& l : cs.losses) loss_sum += l.item();
  const std::vector<float> state = cs.state.narrow(0, 0, 3).to_vector<float>();
  be.check_deferred();
  st.loss = loss_sum / double(cfg_.grad_accum);
  st.skipped = state[AdamWDynamic::skip] != 0.f;
  st.grad_norm = st.skipped ? 0.0 : double(state[AdamWDynamic::norm]);
  opt_->commit_captured_step(st.skipped);
  st.graph = true;
  return true;
}

StepStats Trainer::step() {
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  StepStats st;
  const float lr = cfg_.lr_fn ? cfg_.lr_fn(step_, tokens_) : cfg_.schedule.at(step_);
  if (par_) return parallel_step(lr);
  // bf16 weight copies: written by the previous step's AdamW; nothing else writes the weights
  // between it and this forward (Trainer::load invalidates them through load_state).
  if (cfg_.bf16_weight_copies && model_.options().precision == ops::Precision::bf16)
    opt_->enable_bf16_copies();
  const ops::WeightCopiesScope copies(opt_->bf16_copies());
  std::vector<data::Batch> batches;
  int64_t tokens = 0, seq_len = 0;
  for (int64_t m = 0; m < cfg_.grad_accum; ++m) {
    batches.push_back(train_.next());
    tokens += batches.back().batch_size * batches.back().seq_len;
    seq_len = batches.back().seq_len;
  }
  st.lr = lr;
  if (!graph_step(batches, lr, st)) {
    double loss_sum = 0;
    bool finite = true;
    std::vector<Tensor> losses;  // read after every micro-batch is enqueued: no stall between them
    for (const data::Batch& b : batches) {
      BatchTensors bt = to_tensors(b);
      // The targets counted here, from the host batch: the loss need not read them back.
      int64_t n_valid = 0;
      for (int32_t t : b.targets) n_valid += t >= 0;
      Tensor loss = model_.loss(bt.tokens, bt.targets, bt.doc_ids, n_valid);
      losses.push_back(loss.detach());
      Tensor g = Tensor::full(loss.shape(), 1.0 / double(cfg_.grad_accum), loss.dtype(), loss.device());
      loss.backward(g);
    }
    for (const Tensor& l : losses) {
      const double lv = l.item();
      finite = finite && std::isfinite(lv);
      loss_sum += lv;
    }
    // The gradient norm is non-finite when any gradient element is: one pass over the
    // gradients (one device synchronisation on CUDA) checks them and feeds the clipping.
    const double norm = finite ? opt_->grad_norm() : 0.0;
    finite = finite && std::isfinite(norm);
    st.loss = loss_sum / double(cfg_.grad_accum);
    if (finite)
      st.grad_norm = opt_->step(lr, norm);
    else
      st.skipped = true;
  }
  if (st.skipped) {
    ++skipped_;
    spdlog::warn("step {}: non-finite loss or gradient (loss {}); update skipped ({} so far)", step_ + 1,
                 st.loss, skipped_);
  }
  opt_->zero_grad();
  ++step_;
  tokens_ += tokens;
  st.step = step_;
  st.total = cfg_.steps;
  st.tokens = tokens_;
  st.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  st.tokens_per_s = double(tokens) / st.seconds;
  st.flops_per_s = model_.config().flops_per_token(seq_len) * double(tokens) / st.seconds;
  return st;
}

double Trainer::evaluate() {
  LLAMA3_CHECK(eval_, "trainer: evaluate() without an eval source");
  autograd::NoGradGuard ng;
  eval_->restore(eval_start_);
  double sum = 0;
  for (int64_t i = 0; i < cfg_.eval_batches; ++i) {
    if (par_) {
      // Per eval batch the global mean (as the single-process loss of that batch).
      const BatchTensors bt = local_rows({eval_->next()});
      if (par_->microbatches() != cfg_.parallel.microbatches) par_->set_microbatches(cfg_.parallel.microbatches);
      sum += par_->forward_loss(bt.tokens, bt.targets, bt.doc_ids);
      continue;
    }
    BatchTensors bt = to_tensors(eval_->next());
    sum += model_.loss(bt.tokens, bt.targets, bt.doc_ids).item();
  }
  return sum / double(cfg_.eval_batches);
}

void Trainer::run() {
  while (step_ < cfg_.steps) {
    StepStats st = step();
    if (on_step) on_step(st);
    if (eval_ && cfg_.eval_every > 0 && (step_ % cfg_.eval_every == 0 || step_ == cfg_.steps)) {
      double el = evaluate();
      if (on_eval) on_eval(step_, el);
    }
    if (!cfg_.out_dir.empty() && cfg_.ckpt_every > 0 && step_ % cfg_.ckpt_every == 0 && step_ < cfg_.steps)
      save(cfg_.out_dir + "/checkpoint");
  }
  if (!cfg_.out_dir.empty()) save(cfg_.out_dir + "/checkpoint");
}

namespace {
io::TensorMap model_tensors(const LlamaModel& model) {
  io::TensorMap w;
  for (auto& p : model.named_parameters()) w[p.name] = *p.tensor;
  return w;
}
}  // namespace

void save_model(const LlamaModel& model, const std::string& dir) {
  io::CheckpointWriter w(dir);
  w.tensors("model.safetensors", model_tensors(model), {{"format", "pt"}});
  w.json("config.json", model.config().to_hf_json());
  w.commit();
}

void Trainer::save(const std::string& dir) {
  std::unique_ptr<io::CheckpointWriter> wp;
  const int r = rank();
  if (r == 0) {
    fs::create_directories(fs::path(dir).parent_path());
    wp = std::make_unique<io::CheckpointWriter>(dir);
  }
  if (par_) {
    // Every rank writes its pieces into rank 0's temporary directory; rank 0 then adds the
    // state, checksums every file and renames the directory into place.
    auto world = par_->groups().world;
    world->barrier();
    const std::string tmp = dir + ".tmp";
    dist::save_pieces(tmp, r, par_->checkpoint_pieces(opt_.get()),
                      {{"step", std::to_string(opt_->steps())}, {"layout", cfg_.parallel.dims.str()}});
    world->barrier();
    if (r == 0) {
      for (int k = 0; k < world->size(); ++k) {
        const std::string f = fmt::format("rank-{:05}.safetensors", k);
        if (fs::exists(tmp + "/" + f)) wp->add_file(f);
      }
    }
  } else {
    wp->tensors("model.safetensors", model_tensors(model_), {{"format", "pt"}});
    wp->tensors("optimizer.safetensors", opt_->state_tensors());
  }
  if (r == 0) {
    io::CheckpointWriter& w = *wp;
    w.json("config.json", model_.config().to_hf_json());
    nlohmann::json state = {{"step", step_},
                            {"optimizer_step", opt_->steps()},
                            {"tokens", tokens_},
                            {"skipped_steps", skipped_},
                            {"data", train_.state()},
                            {"extra", extra_state},
                            {"layout", par_ ? cfg_.parallel.dims.str() : "single process"},
                            {"format_version", 1}};
    w.json("trainer_state.json", state);
    w.commit();
  }
  if (par_) par_->groups().world->barrier();
}

namespace {
void load_weights(LlamaModel& model, const std::string& dir) {
  const std::string path = dir + "/model.safetensors";
  io::TensorMap t = io::load_safetensors(path);
  for (auto& p : model.named_parameters()) {
    auto it = t.find(p.name);
    LLAMA3_CHECK(it != t.end(), "{}: missing tensor '{}'", path, p.name);
    LLAMA3_CHECK(it->second.shape() == p.tensor->shape(), "{}: tensor '{}' has shape {}, the model expects {}",
                 path, p.name, shape_str(it->second.shape()), shape_str(p.tensor->shape()));
    p.tensor->detach().copy_(it->second);
  }
}
}  // namespace

std::unique_ptr<LlamaModel> load_model(const std::string& dir) {
  io::verify_checkpoint(dir);
  LlamaConfig c = LlamaConfig::from_hf_json(io::read_json(dir + "/config.json"), dir + "/config.json");
  std::unique_ptr<LlamaModel> m;
  {
    nn::SkipInitGuard overwritten;  // every parameter is loaded next (load_weights checks)
    m = std::make_unique<LlamaModel>(c, 0);
  }
  load_weights(*m, dir);
  return m;
}

void Trainer::load(const std::string& dir) {
  io::verify_checkpoint(dir);
  // A captured step holds the addresses of the weights and state it was captured with.
  graph_.reset();
  warm_key_.clear();
  const auto state = io::read_json(dir + "/trainer_state.json");
  try {
    const int64_t opt_step = state.at("optimizer_step").get<int64_t>();
    const bool distributed = !fs::exists(dir + "/model.safetensors");
    if (!distributed && !par_) {
      load_weights(model_, dir);
      opt_->load_state(io::load_safetensors(dir + "/optimizer.safetensors"), opt_step);
    } else {
      // Full tensors by name (weights and "exp_avg." / "exp_avg_sq." moments), whichever
      // layout wrote them, resliced for this one.
      std::map<std::string, Tensor> full;
      if (distributed) {
        full = dist::load_full(dir);
      } else {
        for (const char* f : {"/model.safetensors", "/optimizer.safetensors"})
          for (auto& [name, t] : io::load_safetensors(dir + f)) full[name] = t;
      }
      if (par_) {
        par_->load_full(full, opt_.get(), opt_step);
      } else {
        std::map<std::string, Tensor> moments;
        for (auto& p : model_.named_parameters()) {
          auto it = full.find(p.name);
          LLAMA3_CHECK(it != full.end(), "{}: missing tensor '{}'", dir, p.name);
          LLAMA3_CHECK(it->second.shape() == p.tensor->shape(), "{}: tensor '{}' has shape {}, the model expects {}",
                       dir, p.name, shape_str(it->second.shape()), shape_str(p.tensor->shape()));
          p.tensor->detach().copy_(it->second);
          for (const std::string pre : {"exp_avg.", "exp_avg_sq."})
            if (full.count(pre + p.name)) moments[pre + p.name] = full.at(pre + p.name);
        }
        opt_->load_state(moments, opt_step);
      }
    }
    step_ = state.at("step").get<int64_t>();
    tokens_ = state.at("tokens").get<int64_t>();
    skipped_ = state.value("skipped_steps", int64_t(0));
    train_.restore(state.at("data"));
    extra_state = state.value("extra", nlohmann::json::object());
  } catch (const nlohmann::json::exception& e) {
    fail("{}/trainer_state.json: {}", dir, e.what());
  }
}

LlamaModel& Trainer::full_model() {
  if (!par_) return model_;
  if (full_ && full_step_ == step_) return *full_;
  std::map<std::string, Tensor> w = par_->full_state_dict();
  if (!full_) {
    nn::SkipInitGuard overwritten;  // every parameter is copied below
    full_ = std::make_unique<LlamaModel>(model_.config(), 0);
    full_->options() = model_.options();
  }
  for (auto& p : full_->named_parameters()) p.tensor->detach().copy_(w.at(p.name));
  full_step_ = step_;
  return *full_;
}

}  // namespace llama3::text
