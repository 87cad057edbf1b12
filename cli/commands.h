// The `llama3` executable's subcommands. Each lives in its own cli/cmd_*.cpp and is
// listed once in kCommands (cli/main.cpp). A command returns the process exit code
// and throws llama3::Error on bad input; main() prints the error.
#pragma once

#include <string>
#include <vector>

namespace llama3::cli {

using Args = std::vector<std::string>;  // arguments after the subcommand name

int cmd_train(const Args& args);
int cmd_tokenizer(const Args& args);
int cmd_data(const Args& args);
int cmd_run(const Args& args);
int cmd_plot(const Args& args);
int cmd_report(const Args& args);
int cmd_scaling(const Args& args);
int cmd_parallel(const Args& args);
int cmd_generate(const Args& args);
int cmd_chat(const Args& args);
int cmd_post(const Args& args);

}  // namespace llama3::cli
