// llama3: entry point. Dispatches to subcommands; the only place errors become exit codes.
#include <cstdio>
#include <exception>
#include <string_view>

#include "cli/commands.h"
#include "runtime/dist/communicator.h"
#include "runtime/core/error.h"

namespace {

struct Command {
  std::string_view name;
  int (*fn)(const llama3::cli::Args&);
  std::string_view help;
};

constexpr Command kCommands[] = {
    {"train", llama3::cli::cmd_train, "pre-train a text model on a corpus (single process)"},
    {"tokenizer", llama3::cli::cmd_tokenizer, "train|encode|decode|stats a BPE tokenizer"},
    {"data", llama3::cli::cmd_data, "curate|tokenize|demo: build and curate training data"},
    {"generate", llama3::cli::cmd_generate, "sample a continuation of a prompt from a checkpoint (KV cache)"},
    {"chat", llama3::cli::cmd_chat, "interactive chat with a checkpoint (stdin lines)"},
    {"post", llama3::cli::cmd_post, "data|sft|rm|rs|dpo|average|rounds: post-training steps"},
    {"run", llama3::cli::cmd_run, "run a staged recipe (recipes/*.textproto)"},
    {"plot", llama3::cli::cmd_plot, "PNG charts of a run's metrics into RUN_DIR/plots"},
    {"report", llama3::cli::cmd_report, "Markdown table of each stage's final metrics (RUN_DIR/report.md)"},
    {"scaling", llama3::cli::cmd_scaling, "sweep|fit: IsoFLOPs scaling-law sweeps and fits"},
    {"parallel", llama3::cli::cmd_parallel, "train under a 4D layout (mpirun) and check it against one process"},
};

void usage() {
  std::fprintf(stderr, "usage: llama3 <command> [args]\n\ncommands:\n");
  for (const auto& c : kCommands)
    std::fprintf(stderr, "  %-10.*s %.*s\n", int(c.name.size()), c.name.data(), int(c.help.size()),
                 c.help.data());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") {
    usage();
    return argc < 2 ? 2 : 0;
  }
  std::string_view name = argv[1];
  llama3::cli::Args args(argv + 2, argv + argc);
  for (const auto& c : kCommands) {
    if (c.name != name) continue;
    try {
      return c.fn(args);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "llama3 %s: error: %s\n", argv[1], e.what());
      // Under mpirun a failed rank takes the job down instead of leaving peers waiting.
      if (llama3::dist::mpi_active()) {
        std::fflush(nullptr);
        llama3::dist::abort_all(1);
      }
      return 1;
    }
  }
  std::fprintf(stderr, "llama3: unknown command '%s'\n", argv[1]);
  usage();
  return 2;
}
