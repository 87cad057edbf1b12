// Iterative rounds: each round trains a reward model, rejection-samples the previous
// round's policy with it, fine-tunes (SFT) on the human-written plus sampled data, and runs
// DPO from the SFT model; the DPO model is the next round's policy.
#include <spdlog/spdlog.h>

#include <filesystem>
#include <set>

#include "text/post/stages.h"

namespace llama3::text::post {

RoundsOptions rounds_from_json(const nlohmann::json& j, const std::string& source) {
  RoundsOptions o;
  static const std::set<std::string> known = {"data_dir", "init_model", "flavour", "seq", "out_dir", "rounds",
                                              "rm_steps", "sft_steps", "dpo_steps", "k", "batch", "rm_lr",
                                              "sft_lr", "dpo_lr", "seed"};
  LLAMA3_CHECK(j.is_object(), "{}: expected a JSON object", source);
  for (auto& [k, v] : j.items())
    LLAMA3_CHECK(known.count(k), "{}: unknown field '{}'", source, k);
  try {
    o.data_dir = j.at("data_dir").get<std::string>();
    o.out_dir = j.at("out_dir").get<std::string>();
    o.init.dir = j.value("init_model", std::string());
    o.init.flavour = j.value("flavour", std::string("debug"));
    o.seq = j.value("seq", o.seq);
    o.rounds = j.value("rounds", o.rounds);
    o.rm_steps = j.value("rm_steps", o.rm_steps);
    o.sft_steps = j.value("sft_steps", o.sft_steps);
    o.dpo_steps = j.value("dpo_steps", o.dpo_steps);
    o.k = j.value("k", o.k);
    o.batch = j.value("batch", o.batch);
    o.rm_lr = j.value("rm_lr", o.rm_lr);
    o.sft_lr = j.value("sft_lr", o.sft_lr);
    o.dpo_lr = j.value("dpo_lr", o.dpo_lr);
    o.seed = j.value("seed", o.seed);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: {}", source, e.what());
  }
  return o;
}

PostStageResult run_rounds(const RoundsOptions& o) {
  namespace fs = std::filesystem;
  fs::create_directories(o.out_dir);
  const std::string d = o.data_dir;
  // The starting model as a checkpoint, so every stage loads it the same way.
  std::string init_dir = o.init.dir;
  if (init_dir.empty()) {
    ModelSource src = o.init;
    if (src.tokenizer.empty()) src.tokenizer = d + "/tokenizer.model";
    if (src.max_seq_len <= 0) src.max_seq_len = o.seq;
    Policy p = load_policy(src);
    init_dir = o.out_dir + "/init";
    save_policy(*p.model, p.tokenizer_path, init_dir);
  }
  nlohmann::json all;
  std::string policy = init_dir;
  for (int64_t r = 1; r <= o.rounds; ++r) {
    const std::string rd = o.out_dir + "/round" + std::to_string(r);
    const std::string pre = "round" + std::to_string(r) + ".";
    spdlog::info("post rounds: round {}/{} (policy {})", r, o.rounds, policy);
    TrainLoopOptions t;
    t.log_every = 50;

    RewardOptions rm;
    rm.model.dir = init_dir;
    rm.prefs = {d + "/prefs.jsonl"};
    rm.eval_prefs = d + "/eval_prefs.jsonl";
    rm.out_dir = rd + "/rm";
    rm.steps = o.rm_steps, rm.batch = o.batch, rm.train = t, rm.train.lr = o.rm_lr, rm.seed = o.seed + r;
    auto rmr = run_reward_model(rm);

    RejectionOptions rs;
    rs.policy.dir = policy;
    rs.reward_model = rm.out_dir;
    rs.prompts = d + "/prompts.jsonl";
    rs.out_dir = rd + "/rs";
    rs.k = o.k;
    rs.sampling.seed = o.seed + r;
    auto rsr = run_rejection_sampling(rs);

    SftOptions sft;
    sft.model.dir = init_dir;
    sft.data = {d + "/sft.jsonl"};
    if (rsr.metrics.value("kept", int64_t(0)) > 0) sft.data.push_back(rs.out_dir + "/sft.jsonl");
    sft.eval_prompts = d + "/eval.jsonl";
    sft.out_dir = rd + "/sft";
    sft.steps = o.sft_steps, sft.batch = o.batch, sft.seq = o.seq, sft.train = t, sft.train.lr = o.sft_lr;
    sft.seed = o.seed + r;
    auto sftr = run_sft(sft);

    DpoOptions dpo;
    dpo.model.dir = sft.out_dir;
    dpo.prefs = {d + "/prefs.jsonl"};
    if (rsr.metrics.value("pairs", int64_t(0)) > 0) dpo.prefs.push_back(rs.out_dir + "/prefs.jsonl");
    dpo.eval_prefs = d + "/eval_prefs.jsonl";
    dpo.reward_model = rm.out_dir;
    dpo.eval_prompts = d + "/eval.jsonl";
    dpo.out_dir = rd + "/dpo";
    dpo.steps = o.dpo_steps, dpo.batch = o.batch, dpo.train = t, dpo.train.lr = o.dpo_lr, dpo.seed = o.seed + r;
    auto dpor = run_dpo(dpo);

    for (auto& [k, v] : rmr.metrics.items()) all[pre + "rm." + k] = v;
    for (auto& [k, v] : rsr.metrics.items()) all[pre + "rs." + k] = v;
    for (auto& [k, v] : sftr.metrics.items()) all[pre + "sft." + k] = v;
    for (auto& [k, v] : dpor.metrics.items()) all[pre + "dpo." + k] = v;
    policy = dpo.out_dir;
  }
  all["final_policy"] = policy;
  write_final(o.out_dir, all);
  return {policy, all};
}

}  // namespace llama3::text::post
