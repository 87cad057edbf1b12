#include "text/post/common.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>

#include "runtime/io/checkpoint.h"
#include "runtime/optim/adamw.h"
#include "text/train/trainer.h"

namespace fs = std::filesystem;

namespace llama3::text::post {

Policy load_policy(const ModelSource& src) {
  Policy p{nullptr, Tokenizer::load(!src.tokenizer.empty() ? src.tokenizer : src.dir + "/tokenizer.model"), "", {}};
  p.tokenizer_path = !src.tokenizer.empty() ? src.tokenizer : src.dir + "/tokenizer.model";
  if (!src.dir.empty()) {
    p.model = load_model(src.dir);
    LLAMA3_CHECK(p.model->config().vocab_size >= p.tok.vocab_size(),
                 "{}: model vocabulary {} is smaller than the tokenizer's {}", src.dir, p.model->config().vocab_size,
                 p.tok.vocab_size());
    io::TensorMap all = io::load_safetensors(src.dir + "/model.safetensors");
    std::set<std::string> names;
    for (auto& np : p.model->named_parameters()) names.insert(np.name);
    for (auto& [k, v] : all)
      if (!names.count(k)) p.extra[k] = v;
  } else {
    LlamaConfig c = llama3_flavour(src.flavour);
    c.vocab_size = p.tok.vocab_size();
    if (src.max_seq_len > 0) c.max_seq_len = src.max_seq_len;
    p.model = std::make_unique<LlamaModel>(c, src.seed);
  }
  return p;
}

void save_policy(const LlamaModel& m, const std::string& tokenizer_path, const std::string& dir,
                 const io::TensorMap& extra) {
  if (fs::path(dir).has_parent_path()) fs::create_directories(fs::path(dir).parent_path());
  io::TensorMap w = extra;
  for (auto& p : m.named_parameters()) w[p.name] = *p.tensor;
  {
    io::CheckpointWriter cw(dir);
    cw.tensors("model.safetensors", w, {{"format", "pt"}});
    cw.json("config.json", m.config().to_hf_json());
    cw.commit();
  }
  if (!tokenizer_path.empty()) fs::copy_file(tokenizer_path, dir + "/tokenizer.model", fs::copy_options::overwrite_existing);
}

void write_final(const std::string& dir, const nlohmann::json& metrics) {
  fs::create_directories(dir);
  std::ofstream(dir + "/final.json") << metrics.dump(2) << "\n";
}

void write_jsonl(const std::string& path, const std::vector<nlohmann::json>& rows) {
  std::ofstream f(path);
  for (const auto& r : rows) f << r.dump() << "\n";
  LLAMA3_CHECK(f.good(), "cannot write {}", path);
}

double train_loop(const std::vector<nn::NamedParam>& params, const TrainLoopOptions& opt,
                  const std::function<Tensor(int64_t)>& loss_fn) {
  optim::AdamWConfig c;
  c.lr = opt.lr, c.weight_decay = opt.weight_decay, c.max_grad_norm = opt.max_grad_norm;
  std::vector<nn::NamedParam> ps;
  for (auto& p : params)
    if (p.info.trainable) ps.push_back(p);
  optim::AdamW adam(ps, c);
  double tail = 0;
  int64_t tail_n = 0;
  const int64_t tail_from = opt.steps - std::max<int64_t>(1, opt.steps / 10);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < opt.steps; ++s) {
    Tensor loss = loss_fn(s);
    const double l = loss.item();
    loss.backward();
    const float lr = opt.lr * (opt.warmup > 0 && s < opt.warmup ? float(s + 1) / float(opt.warmup) : 1.f);
    adam.step(lr);
    adam.zero_grad();
    if (s >= tail_from) tail += l, ++tail_n;
    if (opt.on_step) opt.on_step(s + 1, l, lr);
    if (opt.log_every > 0 && ((s + 1) % opt.log_every == 0 || s + 1 == opt.steps)) {
      double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      spdlog::info("{} step {}/{} loss {:.4f} ({:.1f}s)", opt.tag, s + 1, opt.steps, l, el);
    }
  }
  return tail_n ? tail / double(tail_n) : 0.0;
}

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

std::string decode_text(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  EncodeOptions eo;
  eo.invalid_utf8 = InvalidUtf8::kReplace;
  return tok.decode(tok.encode(tok.decode(ids), eo));
}

std::vector<std::string> respond(const LlamaModel& m, const Tokenizer& tok, const std::vector<DialogRecord>& prompts,
                                 const SamplingOptions& opt) {
  std::vector<std::string> out;
  const size_t bs = 16;
  for (size_t i = 0; i < prompts.size(); i += bs) {
    std::vector<std::vector<int32_t>> ps;
    for (size_t j = i; j < std::min(prompts.size(), i + bs); ++j) ps.push_back(render(tok, prompts[j].messages, true).ids);
    SamplingOptions o = opt;
    o.seed = opt.seed + i;
    for (auto& g : generate(m, ps, o)) out.push_back(decode_text(tok, g.tokens));
  }
  return out;
}

double exact_match(const std::vector<std::string>& responses, const std::vector<DialogRecord>& prompts) {
  int64_t n = 0, ok = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].answer.empty()) continue;
    ++n;
    ok += trim(responses[i]) == trim(prompts[i].answer);
  }
  return n ? double(ok) / double(n) : 0.0;
}

}  // namespace llama3::text::post
