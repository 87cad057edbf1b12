// Command-line flags of the MPI benchmarks (bench_parallel, bench_vocab_loss): `--name value`
// integers and bare `--name` switches, without the CLI's flag parser (these run under mpirun
// with a handful of numeric options).
#pragma once

#include <cstdint>
#include <string>

namespace llama3::bench {

inline int64_t arg(int argc, char** argv, const std::string& name, int64_t def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == name) return std::stoll(argv[i + 1]);
  return def;
}

inline bool flag(int argc, char** argv, const std::string& name) {
  for (int i = 1; i < argc; ++i)
    if (argv[i] == name) return true;
  return false;
}

}  // namespace llama3::bench
