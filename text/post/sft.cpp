// SFT: packed dialogs, loss on assistant tokens only.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <random>

#include "text/post/stages.h"

namespace llama3::text::post {

Tensor PackedBatch::tokens_t() const { return Tensor::from_vector(tokens, {B, T}); }
Tensor PackedBatch::doc_ids_t() const { return Tensor::from_vector(doc_ids, {B, T}); }
Tensor PackedBatch::targets_t() const {
  std::vector<int32_t> t(labels.size());
  for (size_t i = 0; i < t.size(); ++i) t[i] = loss_mask[i] ? labels[i] : -1;
  return Tensor::from_vector(t, {B, T});
}

bool sft_target(TokenKind k, bool with_termination) {
  return k == TokenKind::kAssistant || (with_termination && k == TokenKind::kAssistantEnd);
}

std::vector<PackedBatch> pack_dialogs(const std::vector<Rendered>& dialogs, int64_t T, int64_t rows_per_batch,
                                      bool with_termination, int32_t pad_id) {
  struct Row {
    std::vector<int32_t> tokens, labels, doc;
    std::vector<uint8_t> mask;
  };
  std::vector<Row> rows;
  int32_t doc = 0;
  for (const Rendered& r : dialogs) {
    const int64_t n = int64_t(r.ids.size()) - 1;  // positions this dialog needs
    LLAMA3_CHECK(n <= T, "pack_dialogs: a dialog of {} tokens does not fit rows of {} positions", n + 1, T);
    if (n <= 0) continue;
    if (rows.empty() || int64_t(rows.back().tokens.size()) + n > T) rows.emplace_back();
    Row& row = rows.back();
    for (int64_t i = 0; i < n; ++i) {
      row.tokens.push_back(r.ids[size_t(i)]);
      row.labels.push_back(r.ids[size_t(i + 1)]);
      row.mask.push_back(sft_target(r.kinds[size_t(i + 1)], with_termination));
      row.doc.push_back(doc);
    }
    ++doc;
  }
  std::vector<PackedBatch> out;
  for (size_t i = 0; i < rows.size(); i += size_t(rows_per_batch)) {
    PackedBatch b;
    b.T = T;
    for (size_t j = i; j < std::min(rows.size(), i + size_t(rows_per_batch)); ++j) {
      Row& row = rows[j];
      const int32_t pad_doc = doc + int32_t(j);  // padding is its own document
      while (int64_t(row.tokens.size()) < T) {
        row.tokens.push_back(pad_id);
        row.labels.push_back(pad_id);
        row.mask.push_back(0);
        row.doc.push_back(pad_doc);
      }
      b.tokens.insert(b.tokens.end(), row.tokens.begin(), row.tokens.end());
      b.labels.insert(b.labels.end(), row.labels.begin(), row.labels.end());
      b.loss_mask.insert(b.loss_mask.end(), row.mask.begin(), row.mask.end());
      b.doc_ids.insert(b.doc_ids.end(), row.doc.begin(), row.doc.end());
      ++b.B;
    }
    bool any = false;
    for (uint8_t m : b.loss_mask) any |= m != 0;
    if (any) out.push_back(std::move(b));
  }
  return out;
}

nlohmann::json exact_match_eval(const LlamaModel& m, const Tokenizer& tok,
                                const std::string& eval_prompts, int64_t max_new_tokens,
                                const LoadOptions& load) {
  LoadOptions el = load;
  el.max_tokens = m.config().max_seq_len - max_new_tokens;
  auto prompts = load_prompts(eval_prompts, tok, el, nullptr);
  SamplingOptions so{.greedy = true, .max_new_tokens = max_new_tokens, .stop_ids = stop_ids(tok)};
  auto resp = respond(m, tok, prompts, so);
  return {{"eval_exact_match", exact_match(resp, prompts)},
          {"eval_prompts", int64_t(prompts.size())}};
}

nlohmann::json evaluate_policy(const ModelSource& model, const std::string& eval_prompts,
                               int64_t max_new_tokens) {
  Policy p = load_policy(model);
  return exact_match_eval(*p.model, p.tok, eval_prompts, max_new_tokens, LoadOptions{});
}

PostStageResult run_sft(const SftOptions& o) {
  LLAMA3_CHECK(!o.data.empty(), "sft: no data files");
  LLAMA3_CHECK(!o.out_dir.empty(), "sft: no output directory");
  Policy p = load_policy(o.model);
  LlamaModel& m = *p.model;
  const int64_t T = std::min(o.seq, m.config().max_seq_len);
  LoadOptions lo = o.load;
  lo.max_tokens = T + 1;
  std::vector<Rendered> dialogs;
  nlohmann::json metrics = nlohmann::json::object();
  int64_t skipped = 0, read = 0;
  for (const std::string& f : o.data) {
    LoadReport rep;
    for (auto& d : load_dialogs(f, p.tok, lo, &rep)) dialogs.push_back(render(p.tok, d.messages));
    skipped += rep.skipped_total(), read += rep.read;
    for (auto& [k, v] : rep.skipped) metrics["skipped_" + k] = metrics.value("skipped_" + k, int64_t(0)) + v;
  }
  LLAMA3_CHECK(!dialogs.empty(), "sft: no usable dialogs in {} records ({} skipped)", read, skipped);
  std::mt19937_64 g(o.seed);
  std::shuffle(dialogs.begin(), dialogs.end(), g);
  const int32_t pad = p.tok.eos_id();
  auto batches = pack_dialogs(dialogs, T, o.batch, o.train_on_termination, pad);
  spdlog::info("sft: {} dialogs ({} skipped) packed into {} batches of {} x {}", dialogs.size(), skipped,
               batches.size(), o.batch, T);
  TrainLoopOptions to = o.train;
  to.steps = o.steps;
  to.tag = "sft";
  std::vector<size_t> order(batches.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  const double final_loss = train_loop(m.named_parameters(), to, [&](int64_t s) {
    if (size_t(s) % order.size() == 0) std::shuffle(order.begin(), order.end(), g);
    const PackedBatch& b = batches[order[size_t(s) % order.size()]];
    return m.loss(b.tokens_t(), b.targets_t(), b.doc_ids_t());
  });
  metrics["train_loss"] = final_loss;
  metrics["dialogs"] = int64_t(dialogs.size());
  metrics["skipped"] = skipped;
  metrics["steps"] = o.steps;
  if (!o.eval_prompts.empty())
    metrics.update(exact_match_eval(m, p.tok, o.eval_prompts, o.max_new_tokens, o.load));
  save_policy(m, p.tokenizer_path, o.out_dir, p.extra);
  write_final(o.out_dir, metrics);
  return {o.out_dir, metrics};
}

}  // namespace llama3::text::post
