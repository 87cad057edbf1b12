// The embedded default post-training data: generated tasks with verifiable answers
// (arithmetic word problems, formatting instructions), as SFT dialogs, prompts and
// preference pairs (correct vs incorrect answer, followed vs ignored instruction).
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include "runtime/core/error.h"
#include "runtime/core/rng.h"
#include "text/post/stages.h"

namespace llama3::text::post {

namespace {

// 60 words, and two phrasings of each formatting instruction: 360 distinct formatting prompts,
// so a few hundred held-out prompts leave most of them (and every word in some phrasing) for
// training.
const char* kWords[] = {
    "apple",  "river",  "stone",  "cloud",  "green",  "tiger",  "piano",  "lemon",  "house",
    "bread",  "chair",  "light",  "music",  "ocean",  "plant",  "smile",  "train",  "water",
    "zebra",  "candle", "forest", "garden", "window", "yellow", "silver", "dragon", "rocket",
    "planet", "winter", "summer", "orange", "purple", "castle", "bridge", "market", "pencil",
    "basket", "butter", "circle", "doctor", "engine", "flower", "friend", "guitar", "island",
    "jacket", "letter", "mirror", "monkey", "number", "pepper", "pocket", "rabbit", "shadow",
    "spring", "sugar",  "table",  "tomato", "turtle", "valley"};
const char* kNames[] = {"Sam", "Ana", "Tom", "Mia", "Leo", "Eva", "Max", "Zoe"};
const char* kThings[] = {"apples", "books", "coins", "shells", "pens", "cards"};
constexpr int kNWords = sizeof(kWords) / sizeof(kWords[0]);

struct Task {
  std::string system, prompt, answer;
  std::string near_miss, wrong;  // a slightly and a clearly wrong response
};

std::string upper(std::string s) {
  for (auto& c : s) c = char(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

Task make_task(Rng& rng) {
  Task t;
  if (rng.below(3) == 0) t.system = "You are a concise assistant.";
  const uint64_t kind = rng.below(5);
  if (kind <= 1) {  // arithmetic
    const int a = int(rng.below(9)) + 1, b = int(rng.below(9)) + 1;
    if (kind == 0) {
      t.prompt = fmt::format("What is {} + {}?", a, b);
    } else {
      const char* n = kNames[rng.below(8)];
      const char* th = kThings[rng.below(6)];
      t.prompt = fmt::format("{} has {} {} and gets {} more. How many {} does {} have?", n, a, th,
                             b, th, n);
    }
    const int sum = a + b, side = rng.below(2) ? 1 : -1;
    t.answer = std::to_string(sum);
    t.near_miss = std::to_string(sum + side);
    // The clear miss lies on the other side of the answer from the near miss, so that across
    // the pairs neither the smaller nor the larger number is the better one. A clear miss that
    // was always larger (a * b, or a + b + 10) taught the reward models to prefer the smaller
    // number, and so the policy's off-by-one-below answers over right ones
    // (docs/post-training-history.md).
    if (side < 0)
      t.wrong = std::to_string(a * b > sum + 1 ? a * b : sum + 10);
    else
      t.wrong = std::to_string(std::abs(a - b));  // at most sum - 2
    return t;
  }
  const uint64_t wi = rng.below(kNWords), r = rng.below(kNWords - 1);
  const std::string w = kWords[wi];
  const std::string other = kWords[(wi + 1 + r) % kNWords];  // never w
  // Half the clear misses are spliced from two other words ("doc" + "ean"): the policy's own
  // wrong answers are mostly such fragments, not real words. With real words as the only
  // clear misses, the reward models learnt to score any real other word below fragments they
  // had never seen, and so judged a policy that misspells less as worse
  // (docs/post-training-history.md).
  const std::string third = kWords[(wi + 1 + (r + 1) % (kNWords - 1)) % kNWords];  // not w
  const std::string splice =
      other.substr(0, (other.size() + 1) / 2) + third.substr(third.size() / 2);
  const std::string miss = r % 2 && splice != w ? splice : other;
  const bool alt = rng.below(2) == 1;  // the second phrasing
  if (kind == 2) {
    t.prompt = fmt::format(
        fmt::runtime(alt ? "Write {} in capital letters." : "Write the word {} in uppercase."), w);
    t.answer = upper(w);
    t.near_miss =
        std::string(1, char(std::toupper(static_cast<unsigned char>(w[0])))) + w.substr(1);
    t.wrong = r % 2 ? upper(miss) : w;
  } else if (kind == 3) {
    t.prompt = fmt::format(fmt::runtime(alt ? "Say {} and finish with a period."
                                            : "Write the word {} and end with a period."),
                           w);
    t.answer = w + ".";
    t.near_miss = w;
    t.wrong = miss;
  } else {
    t.prompt = fmt::format(fmt::runtime(alt ? "Say the word {} again." : "Repeat the word {}."), w);
    t.answer = w;
    t.near_miss = upper(w);
    // Half these clear misses in capitals, mirroring the uppercase task's lower-case ones: with
    // lower-case misses only, an all-capitals response was the better one in 64% of the pairs
    // where exactly one response was, and the RMs preferred SPRING to spring
    // (docs/post-training-history.md).
    t.wrong = (r / 2) % 2 ? upper(miss) : miss;
  }
  return t;
}

nlohmann::json prompt_json(const Task& t) {
  nlohmann::json m = nlohmann::json::array();
  if (!t.system.empty()) m.push_back({{"role", "system"}, {"content", t.system}});
  m.push_back({{"role", "user"}, {"content", t.prompt}});
  return m;
}

}  // namespace

bool verify(const DialogRecord& prompt, const std::string& response) {
  return !prompt.answer.empty() && trim(response) == trim(prompt.answer);
}

PostStageResult make_default_data(const DefaultDataOptions& o) {
  namespace fs = std::filesystem;
  fs::create_directories(o.out_dir);
  Rng rng(o.seed * 7919 + 17);
  std::ofstream sft(o.out_dir + "/sft.jsonl"), prompts(o.out_dir + "/prompts.jsonl"),
      evalf(o.out_dir + "/eval.jsonl"), prefs(o.out_dir + "/prefs.jsonl"),
      eprefs(o.out_dir + "/eval_prefs.jsonl"), corpus(o.out_dir + "/corpus.txt");
  std::set<std::string> eval_prompts;
  std::vector<Task> ev;
  int64_t draws = 0;
  while (int64_t(ev.size()) < o.n_eval) {  // held-out prompts never appear in training files
    LLAMA3_CHECK(++draws < 100 * o.n_eval + 1000,
                 "post data: cannot draw {} distinct held-out prompts (eval_prompts too large for "
                 "the task space)",
                 o.n_eval);
    Task t = make_task(rng);
    if (eval_prompts.insert(t.prompt).second) ev.push_back(t);
  }
  auto fresh = [&]() {
    for (;;) {
      Task t = make_task(rng);
      if (!eval_prompts.count(t.prompt)) return t;
    }
  };
  for (int64_t i = 0; i < o.n_train; ++i) {
    Task t = fresh();
    nlohmann::json m = prompt_json(t);
    nlohmann::json full = m;
    full.push_back({{"role", "assistant"}, {"content", t.answer}});
    sft << nlohmann::json({{"messages", full}, {"answer", t.answer}}).dump() << "\n";
    corpus << t.system << "\n" << t.prompt << "\n" << t.answer << "\n" << t.wrong << "\n";
  }
  for (int64_t i = 0; i < o.n_prompts; ++i) {
    Task u = fresh();
    prompts << nlohmann::json({{"prompt", prompt_json(u)}, {"answer", u.answer}}).dump() << "\n";
  }
  auto pref = [&](const Task& t, uint64_t r) {
    nlohmann::json j = {{"prompt", prompt_json(t)}};
    if (r % 4 == 0) {  // an edited response above a near miss above a clear miss
      j["edited"] = t.answer, j["chosen"] = t.near_miss, j["rejected"] = t.wrong;
    } else {
      j["chosen"] = t.answer, j["rejected"] = r % 2 ? t.wrong : t.near_miss;
    }
    return j;
  };
  for (int64_t i = 0; i < o.n_pref; ++i) prefs << pref(fresh(), rng.below(1000)).dump() << "\n";
  for (const Task& t : ev) {
    evalf << nlohmann::json({{"prompt", prompt_json(t)}, {"answer", t.answer}}).dump() << "\n";
    // Held-out pairs alternate a clear miss and a near miss (off by one, the wrong case, no
    // period): the near misses are the kind of mistake the policy itself makes.
    nlohmann::json j = {{"prompt", prompt_json(t)},
                        {"chosen", t.answer},
                        {"rejected", (&t - ev.data()) % 2 ? t.near_miss : t.wrong}};
    eprefs << j.dump() << "\n";
  }
  for (const char* w : kWords) corpus << w << " " << upper(w) << " " << w << ".\n";
  corpus.close();
  sft.close(), prompts.close(), evalf.close(), prefs.close(), eprefs.close();
  if (!o.tokenizer.empty()) {
    fs::copy_file(o.tokenizer, o.out_dir + "/tokenizer.model",
                  fs::copy_options::overwrite_existing);
  } else {
    BpeTrainOptions bo;
    bo.vocab_size = int32_t(o.bpe_vocab);
    std::vector<std::string> files = {o.out_dir + "/corpus.txt"};
    train_bpe(files, bo, o.out_dir + "/tokenizer.model");
  }
  nlohmann::json metrics = {{"sft_dialogs", o.n_train},
                            {"prompts", o.n_prompts},
                            {"prefs", o.n_pref},
                            {"eval_prompts", o.n_eval},
                            {"eval_prefs", o.n_eval}};
  write_final(o.out_dir, metrics);
  return {o.out_dir, metrics};
}

}  // namespace llama3::text::post
