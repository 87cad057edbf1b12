// `llama3 data curate|tokenize|demo`: thin over text/data (see docs/data.md).
#include <fmt/format.h>

#include <filesystem>

#include "cli/commands.h"
#include "runtime/core/error.h"
#include "text/data/build.h"
#include "text/data/classifier.h"
#include "text/data/curate.h"

namespace llama3::cli {
namespace {

constexpr const char* kUsage =
    "usage:\n"
    "  llama3 data curate CONFIG.json             run the curation pipeline (docs/data.md)\n"
    "  llama3 data tokenize --vocab TOKENIZER --in FILE.jsonl --out SHARD\n"
    "  llama3 data demo --out DIR [--vocab-size N] build the embedded default corpus\n"
    "  llama3 data train-classifier --in EXAMPLES.jsonl --out MODEL [--epochs N]\n"
    "      train a hashed-n-gram classifier on {\"text\", \"label\"} lines (every 10th held out)\n";

// Value of `--name VALUE`; throws naming the flag when missing.
std::string flag(const Args& a, const std::string& name, const std::string& def = "",
                 bool required = true) {
  for (size_t i = 0; i + 1 < a.size(); ++i)
    if (a[i] == name) return a[i + 1];
  if (required) fail("data: missing {} VALUE\n{}", name, kUsage);
  return def;
}

int to_int(const std::string& flag_name, const std::string& v) {
  size_t used = 0;
  int x = 0;
  try {
    x = std::stoi(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || x <= 0)
    fail("data: {} expects a positive integer, got '{}'", flag_name, v);
  return x;
}

}  // namespace

int cmd_data(const Args& args) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    fmt::print("{}", kUsage);
    return args.empty() ? 2 : 0;
  }
  const std::string& sub = args[0];
  Args rest(args.begin() + 1, args.end());
  if (sub == "curate") {
    if (rest.size() != 1) fail("data curate: expected one CONFIG.json\n{}", kUsage);
    auto cfg = data::CurateConfig::load(rest[0]);
    auto rep = data::curate(cfg);
    fmt::print("{}wrote {} and {}\n", rep.table(), cfg.output, cfg.report);
    return 0;
  }
  if (sub == "tokenize") {
    auto tok = text::Tokenizer::load(flag(rest, "--vocab"));
    std::string in = flag(rest, "--in"), out = flag(rest, "--out");
    auto st = data::tokenize_jsonl(tok, in, out);
    fmt::print("wrote {}: {} documents, {} tokens (vocab {})\n", out, st.docs, st.tokens,
               tok.vocab_size());
    return 0;
  }
  if (sub == "demo") {
    data::DemoOptions o;
    o.out_dir = flag(rest, "--out");
    std::string v = flag(rest, "--vocab-size", "", false);
    if (!v.empty()) o.vocab_size = to_int("--vocab-size", v);
    data::build_demo(o);
    return 0;
  }
  if (sub == "train-classifier") {
    std::string in = flag(rest, "--in"), out = flag(rest, "--out");
    data::ClassifierOptions o;
    std::string ep = flag(rest, "--epochs", "", false);
    if (!ep.empty()) o.epochs = to_int("--epochs", ep);
    auto ex = data::HashedClassifier::read_examples(in);
    std::vector<data::LabelledText> train, held;
    for (size_t i = 0; i < ex.size(); ++i) (i % 10 == 9 ? held : train).push_back(ex[i]);
    auto clf = data::HashedClassifier::train(train, o);
    clf.save(out);
    std::string labels;
    for (const auto& l : clf.labels()) labels += (labels.empty() ? "" : ", ") + l;
    fmt::print(
        "wrote {}: labels [{}], {} training examples (accuracy {:.3f}), {} held out (accuracy "
        "{:.3f})\n",
        out, labels, train.size(), clf.accuracy(train), held.size(),
        held.empty() ? 0.0 : clf.accuracy(held));
    return 0;
  }
  fail("data: unknown subcommand '{}'\n{}", sub, kUsage);
}

}  // namespace llama3::cli
