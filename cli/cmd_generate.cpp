// `llama3 generate` (one prompt, or a batch of copies) and `llama3 chat` (an interactive
// dialog on stdin): KV-cache sampling from a checkpoint directory with its tokenizer.
#include <cstdio>
#include <iostream>

#include "cli/flags.h"
#include "text/post/common.h"

namespace llama3::cli {

namespace {
const std::set<std::string> kSampling = {"--model", "--tokenizer", "--temperature", "--top-p", "--top-k",
                                         "--max-new", "--seed", "--system"};

text::SamplingOptions sampling(const Flags& f, const text::Tokenizer& tok) {
  text::SamplingOptions o;
  o.greedy = f.has("--greedy");
  o.temperature = float(f.real("--temperature", 0.7));
  o.top_p = float(f.real("--top-p", 0.9));
  o.top_k = f.integer("--top-k", 0);
  o.max_new_tokens = f.integer("--max-new", 64);
  o.seed = uint64_t(f.integer("--seed", 0));
  o.stop_ids = text::post::stop_ids(tok);
  return o;
}
}  // namespace

int cmd_generate(const Args& args) {
  auto valued = kSampling;
  valued.insert({"--prompt", "--batch"});
  Flags f(args, valued, {"--greedy", "--raw"},
          "usage: llama3 generate --model DIR --prompt TEXT [--system TEXT] [--raw] [--batch 1]\n"
          "                       [--greedy | --temperature 0.7 --top-p 0.9 --top-k 0] [--max-new 64] [--seed 0]\n"
          "  --raw feeds the prompt as plain text (no chat format).");
  using namespace text::post;
  Policy p = load_policy(ModelSource{.dir = f.required("--model"), .tokenizer = f.str("--tokenizer")});
  const std::string prompt = f.required("--prompt");
  std::vector<int32_t> ids;
  if (f.has("--raw")) {
    ids = p.tok.encode(prompt);
    ids.insert(ids.begin(), p.tok.bos_id());
  } else {
    Dialog d;
    if (f.has("--system")) d.push_back({Role::kSystem, f.str("--system"), false});
    d.push_back({Role::kUser, prompt, false});
    ids = render(p.tok, d, true).ids;
  }
  const int64_t B = f.integer("--batch", 1);
  text::GenerateStats st;
  auto gens = text::generate(*p.model, std::vector<std::vector<int32_t>>(size_t(B), ids), sampling(f, p.tok), &st);
  for (auto& g : gens) std::printf("%s\n", p.tok.decode(g.tokens).c_str());
  std::fprintf(stderr, "[%lld new tokens, prefill %.3fs, decode %.3fs, %.1f tokens/s]\n", (long long)st.new_tokens,
               st.prefill_s, st.decode_s, double(st.new_tokens) / std::max(1e-9, st.prefill_s + st.decode_s));
  return 0;
}

int cmd_chat(const Args& args) {
  Flags f(args, kSampling, {"--greedy"},
          "usage: llama3 chat --model DIR [--system TEXT] [sampling flags as for generate]\n"
          "  reads one user message per stdin line; the dialog is kept; an empty line or EOF ends it.");
  using namespace text::post;
  Policy p = load_policy(ModelSource{.dir = f.required("--model"), .tokenizer = f.str("--tokenizer")});
  auto so = sampling(f, p.tok);
  Dialog d;
  if (f.has("--system")) d.push_back({Role::kSystem, f.str("--system"), false});
  std::string line;
  int64_t turn = 0;
  while (std::fprintf(stderr, "> "), std::getline(std::cin, line)) {
    if (trim(line).empty()) break;
    d.push_back({Role::kUser, line, false});
    so.seed += uint64_t(turn++);
    auto g = text::generate(*p.model, {render(p.tok, d, true).ids}, so);
    const std::string reply = decode_text(p.tok, g[0].tokens);
    std::printf("%s\n", reply.c_str());
    std::fflush(stdout);
    d.push_back({Role::kAssistant, reply, false});
  }
  return 0;
}

}  // namespace llama3::cli
