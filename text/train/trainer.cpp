#include "text/train/trainer.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <filesystem>

#include "runtime/autograd/autograd.h"
#include "runtime/backend/backend.h"
#include "runtime/io/checkpoint.h"

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

Trainer::Trainer(LlamaModel& model, const TrainerConfig& cfg, BatchSource& train, BatchSource* eval)
    : model_(model), cfg_(cfg), train_(train), eval_(eval), opt_(model.named_parameters(), cfg.adamw) {
  LLAMA3_CHECK(cfg_.grad_accum >= 1, "trainer: grad_accum {} must be >= 1", cfg_.grad_accum);
  if (eval_) eval_start_ = eval_->state();
}

void Trainer::set_grad_accum(int64_t n) {
  LLAMA3_CHECK(n >= 1, "trainer: grad_accum {} must be >= 1", n);
  cfg_.grad_accum = n;
}

StepStats Trainer::step() {
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  StepStats st;
  const float lr = cfg_.lr_fn ? cfg_.lr_fn(step_, tokens_) : cfg_.schedule.at(step_);
  double loss_sum = 0;
  int64_t tokens = 0, seq_len = 0;
  bool finite = true;
  for (int64_t m = 0; m < cfg_.grad_accum; ++m) {
    data::Batch b = train_.next();
    BatchTensors bt = to_tensors(b);
    Tensor loss = model_.loss(bt.tokens, bt.targets, bt.doc_ids);
    const double lv = loss.item();
    finite = finite && std::isfinite(lv);
    loss_sum += lv;
    tokens += b.batch_size * b.seq_len;
    seq_len = b.seq_len;
    Tensor g = Tensor::full(loss.shape(), 1.0 / double(cfg_.grad_accum), loss.dtype(), loss.device());
    loss.backward(g);
  }
  if (finite) {
    for (auto& p : opt_.params()) {
      Tensor gr = p.tensor->grad();
      if (gr.defined() && !backend_for(gr.device()).all_finite(gr)) {
        finite = false;
        break;
      }
    }
  }
  st.loss = loss_sum / double(cfg_.grad_accum);
  st.lr = lr;
  if (finite) {
    st.grad_norm = opt_.step(lr);
  } else {
    st.skipped = true;
    ++skipped_;
    spdlog::warn("step {}: non-finite loss or gradient (loss {}); update skipped ({} so far)", step_ + 1,
                 st.loss, skipped_);
  }
  opt_.zero_grad();
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
  fs::create_directories(fs::path(dir).parent_path());
  io::CheckpointWriter w(dir);
  w.tensors("model.safetensors", model_tensors(model_), {{"format", "pt"}});
  w.json("config.json", model_.config().to_hf_json());
  w.tensors("optimizer.safetensors", opt_.state_tensors());
  nlohmann::json state = {{"step", step_},
                          {"optimizer_step", opt_.steps()},
                          {"tokens", tokens_},
                          {"skipped_steps", skipped_},
                          {"data", train_.state()},
                          {"extra", extra_state},
                          {"format_version", 1}};
  w.json("trainer_state.json", state);
  w.commit();
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
  auto m = std::make_unique<LlamaModel>(c, 0);
  load_weights(*m, dir);
  return m;
}

void Trainer::load(const std::string& dir) {
  io::verify_checkpoint(dir);
  load_weights(model_, dir);
  const auto state = io::read_json(dir + "/trainer_state.json");
  try {
    opt_.load_state(io::load_safetensors(dir + "/optimizer.safetensors"), state.at("optimizer_step").get<int64_t>());
    step_ = state.at("step").get<int64_t>();
    tokens_ = state.at("tokens").get<int64_t>();
    skipped_ = state.value("skipped_steps", int64_t(0));
    train_.restore(state.at("data"));
    extra_state = state.value("extra", nlohmann::json::object());
  } catch (const nlohmann::json::exception& e) {
    fail("{}/trainer_state.json: {}", dir, e.what());
  }
}

}  // namespace llama3::text
