// Errors: library code throws llama3::Error carrying the file/field/values at fault;
// only main() turns errors into exit codes, so tests can observe every failure.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace llama3 {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Throws llama3::Error with a formatted message.
template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace llama3

// LLAMA3_CHECK(cond, "format {}", args...): throws llama3::Error naming the source line.
#define LLAMA3_CHECK(cond, ...)                                                           \
  do {                                                                                    \
    if (!(cond)) [[unlikely]] {                                                           \
      throw ::llama3::Error(::fmt::format("{} ({}:{})", ::fmt::format(__VA_ARGS__),       \
                                          __FILE__, __LINE__));                           \
    }                                                                                     \
  } while (0)
