// Helpers shared by the recipe tests: the message of the llama3::Error a call throws, and a
// checked text substitution for deriving a broken recipe from a good one.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "runtime/core/error.h"

namespace llama3::recipes::test_util {

// The llama3::Error message f throws, or "(no error)".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// s with the first `from` replaced by `to`; a missing `from` fails the test.
inline std::string replace(std::string s, const std::string& from, const std::string& to) {
  auto p = s.find(from);
  EXPECT_NE(p, std::string::npos) << from;
  return p == std::string::npos ? s : s.replace(p, from.size(), to);
}

}  // namespace llama3::recipes::test_util
