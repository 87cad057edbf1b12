// `llama3 post data|sft|rm|rs|dpo|average|rounds`: the post-training stages (text/post)
// from the command line. Each prints its final metrics (also in <out>/final.json).
#include <cstdio>

#include "cli/flags.h"
#include "runtime/io/checkpoint.h"
#include "text/post/stages.h"

namespace llama3::cli {

namespace {
using namespace text::post;

const char* kUsage =
    "usage: llama3 post <step> [flags]\n"
    "  data    --out DIR [--train 600] [--eval 60] [--prefs 600] [--prompts 100] [--tokenizer "
    "FILE] [--seed 0]\n"
    "  sft     --data FILE [--data ...] --out DIR [--eval FILE] MODEL TRAIN\n"
    "  rm      --prefs FILE [--prefs ...] --out DIR [--eval FILE] [--on-policy FILE ...] "
    "[--on-policy-fraction 0] [--balance-responses]\n"
    "          [--eval-on-policy FILE ...] [--eval-common FILE ...] [--compare-rm DIR] MODEL "
    "TRAIN\n"
    "  rs      --model DIR --rm DIR --prompts FILE --out DIR [--k 8] [--temperature 1] [--top-p "
    "0.95] [--require-correct]\n"
    "          [--max-new 24] [--min-score X] [--rank-wrong-pairs]\n"
    "  dpo     --prefs FILE [--prefs ...] --out DIR [--eval FILE] [--rm DIR] [--eval-prompts "
    "FILE]\n"
    "          [--beta 0.1] [--alpha 0.2] [--win-samples K] MODEL TRAIN\n"
    "  average --model DIR --model DIR ... [--weight W ...] --out DIR\n"
    "  rounds  CONFIG.json   (fields: data_dir, out_dir, init_model|flavour, rounds, seq, batch, "
    "k,\n"
    "          rm_steps, sft_steps, dpo_steps, rm_lr, sft_lr, dpo_lr, seed)\n"
    "  MODEL = --model DIR | --flavour debug [--tokenizer FILE] [--seq 128] [--seed 0]\n"
    "  TRAIN = [--steps N] [--batch 8] [--lr X] [--warmup 10] [--bad-input skip|fail]";

const std::set<std::string> kModelTrain = {"--model",  "--flavour", "--tokenizer", "--seq",
                                           "--seed",   "--steps",   "--batch",     "--lr",
                                           "--warmup", "--out",     "--eval",      "--bad-input"};

ModelSource model_source(const Flags& f) {
  ModelSource s;
  s.dir = f.str("--model");
  s.flavour = f.str("--flavour", "debug");
  s.tokenizer = f.str("--tokenizer");
  s.seed = uint64_t(f.integer("--seed", 0));
  s.max_seq_len = f.integer("--seq", 0);
  LLAMA3_CHECK(!s.dir.empty() || !s.tokenizer.empty(),
               "give --model DIR, or --flavour with --tokenizer FILE\n{}", kUsage);
  return s;
}
TrainLoopOptions train_opts(const Flags& f, float lr) {
  TrainLoopOptions t;
  t.lr = float(f.real("--lr", lr));
  t.warmup = f.integer("--warmup", 10);
  return t;
}
LoadOptions load_opts(const Flags& f) {
  LoadOptions l;
  l.bad_input = parse_bad_input(f.str("--bad-input", "skip"));
  return l;
}
int print(const PostStageResult& r) {
  std::printf("%s\n", r.metrics.dump(2).c_str());
  return 0;
}
std::set<std::string> with(std::set<std::string> s, std::initializer_list<const char*> more) {
  for (auto m : more) s.insert(m);
  return s;
}
}  // namespace

int cmd_post(const Args& all) {
  LLAMA3_CHECK(!all.empty(), "{}", kUsage);
  const std::string step = all[0];
  const Args args(all.begin() + 1, all.end());
  if (step == "data") {
    Flags f(args,
            {"--out", "--train", "--eval", "--prefs", "--prompts", "--tokenizer", "--seed",
             "--bpe-vocab"},
            {}, kUsage);
    DefaultDataOptions o;
    o.out_dir = f.required("--out");
    o.n_train = f.integer("--train", o.n_train);
    o.n_eval = f.integer("--eval", o.n_eval);
    o.n_pref = f.integer("--prefs", o.n_pref);
    o.n_prompts = f.integer("--prompts", o.n_prompts);
    o.tokenizer = f.str("--tokenizer");
    o.seed = uint64_t(f.integer("--seed", 0));
    o.bpe_vocab = f.integer("--bpe-vocab", o.bpe_vocab);
    return print(make_default_data(o));
  }
  if (step == "sft") {
    Flags f(args, with(kModelTrain, {"--data", "--max-new"}), {"--no-eot-target"}, kUsage);
    SftOptions o;
    o.model = model_source(f);
    o.data = f.all("--data");
    o.eval_prompts = f.str("--eval");
    o.out_dir = f.required("--out");
    o.steps = f.integer("--steps", o.steps);
    o.batch = f.integer("--batch", o.batch);
    o.seq = f.integer("--seq", o.seq);
    o.train = train_opts(f, 2e-3f);
    o.train_on_termination = !f.has("--no-eot-target");
    o.load = load_opts(f);
    o.max_new_tokens = f.integer("--max-new", o.max_new_tokens);
    o.seed = uint64_t(f.integer("--seed", 0));
    return print(run_sft(o));
  }
  if (step == "rm") {
    Flags f(args,
            with(kModelTrain, {"--prefs", "--on-policy", "--on-policy-fraction", "--eval-on-policy",
                               "--eval-common", "--compare-rm"}),
            {"--balance-responses"}, kUsage);
    RewardOptions o;
    o.model = model_source(f);
    o.prefs = f.all("--prefs");
    o.on_policy_prefs = f.all("--on-policy");
    o.on_policy_fraction = f.real("--on-policy-fraction", 0.0);
    o.balance_responses = f.has("--balance-responses");
    o.eval_on_policy = f.all("--eval-on-policy");
    o.common_eval_on_policy = f.all("--eval-common");
    o.compare_with = f.str("--compare-rm");
    o.eval_prefs = f.str("--eval");
    o.out_dir = f.required("--out");
    o.steps = f.integer("--steps", o.steps);
    o.batch = f.integer("--batch", o.batch);
    o.train = train_opts(f, 1e-3f);
    o.load = load_opts(f);
    o.seed = uint64_t(f.integer("--seed", 0));
    return print(run_reward_model(o));
  }
  if (step == "rs") {
    Flags f(args,
            {"--model", "--rm", "--prompts", "--out", "--k", "--temperature", "--top-p", "--top-k",
             "--max-new", "--min-score", "--seed", "--bad-input"},
            {"--require-correct", "--rank-wrong-pairs"}, kUsage);
    RejectionOptions o;
    o.policy.dir = f.required("--model");
    o.reward_model = f.required("--rm");
    o.prompts = f.required("--prompts");
    o.out_dir = f.required("--out");
    o.k = f.integer("--k", o.k);
    o.sampling.temperature = float(f.real("--temperature", o.sampling.temperature));
    o.sampling.top_p = float(f.real("--top-p", o.sampling.top_p));
    o.sampling.top_k = f.integer("--top-k", 0);
    o.sampling.max_new_tokens = f.integer("--max-new", o.sampling.max_new_tokens);
    o.sampling.seed = uint64_t(f.integer("--seed", 0));
    o.min_score = f.real("--min-score", o.min_score);
    o.require_correct = f.has("--require-correct");
    o.rank_wrong_pairs = f.has("--rank-wrong-pairs");
    o.load = load_opts(f);
    return print(run_rejection_sampling(o));
  }
  if (step == "dpo") {
    Flags f(args,
            with(kModelTrain, {"--prefs", "--rm", "--eval-prompts", "--beta", "--alpha",
                               "--max-new", "--win-samples"}),
            {}, kUsage);
    DpoOptions o;
    o.model = model_source(f);
    o.prefs = f.all("--prefs");
    o.eval_prefs = f.str("--eval");
    o.reward_model = f.str("--rm");
    o.eval_prompts = f.str("--eval-prompts");
    o.out_dir = f.required("--out");
    o.beta = float(f.real("--beta", o.beta));
    o.alpha = float(f.real("--alpha", o.alpha));
    o.steps = f.integer("--steps", o.steps);
    o.batch = f.integer("--batch", o.batch);
    o.train = train_opts(f, 2e-4f);
    o.load = load_opts(f);
    o.max_new_tokens = f.integer("--max-new", o.max_new_tokens);
    o.win_rate_samples = f.integer("--win-samples", 0);
    LLAMA3_CHECK(o.win_rate_samples >= 0, "--win-samples must be >= 0, got {}", o.win_rate_samples);
    LLAMA3_CHECK(o.win_rate_samples == 0 || !o.reward_model.empty(),
                 "--win-samples {} needs --rm (the judge) and --eval-prompts", o.win_rate_samples);
    o.seed = uint64_t(f.integer("--seed", 0));
    return print(run_dpo(o));
  }
  if (step == "average") {
    Flags f(args, {"--model", "--weight", "--out"}, {}, kUsage);
    AverageOptions o;
    o.models = f.all("--model");
    for (auto& w : f.all("--weight")) {
      try {
        o.weights.push_back(std::stod(w));
      } catch (const std::exception&) {
        fail("--weight expects a number, got '{}'", w);
      }
    }
    o.out_dir = f.required("--out");
    return print(run_average(o));
  }
  if (step == "rounds") {
    Flags f(args, {}, {}, kUsage);
    LLAMA3_CHECK(f.positional().size() == 1, "post rounds takes one CONFIG.json\n{}", kUsage);
    const std::string path = f.positional()[0];
    return print(run_rounds(rounds_from_json(io::read_json(path), path)));
  }
  fail("unknown post step '{}'\n{}", step, kUsage);
}

}  // namespace llama3::cli
