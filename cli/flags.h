// A small flag parser for subcommands: `--name value` and `--switch`, typed getters whose
// errors name the flag and the bad value, and a check that no unknown flag was given.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "runtime/core/error.h"

namespace llama3::cli {

class Flags {
 public:
  // `valued` take one value (repeatable ones collect every occurrence); `switches` none.
  Flags(const Args& args, std::set<std::string> valued, std::set<std::string> switches,
        const std::string& usage)
      : usage_(usage) {
    for (size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      if (a == "--help" || a == "-h") fail("{}", usage);
      if (valued.count(a)) {
        LLAMA3_CHECK(i + 1 < args.size(), "{} needs a value\n{}", a, usage);
        values_[a].push_back(args[++i]);
      } else if (switches.count(a)) {
        switches_.insert(a);
      } else if (a.rfind("--", 0) == 0) {
        fail("unknown option {}\n{}", a, usage);
      } else {
        positional_.push_back(a);
      }
    }
  }
  bool has(const std::string& f) const { return values_.count(f) || switches_.count(f); }
  std::string str(const std::string& f, const std::string& def = "") const {
    auto it = values_.find(f);
    return it == values_.end() ? def : it->second.back();
  }
  std::string required(const std::string& f) const {
    LLAMA3_CHECK(values_.count(f), "missing {}\n{}", f, usage_);
    return str(f);
  }
  std::vector<std::string> all(const std::string& f) const {
    auto it = values_.find(f);
    return it == values_.end() ? std::vector<std::string>{} : it->second;
  }
  int64_t integer(const std::string& f, int64_t def) const {
    if (!values_.count(f)) return def;
    const std::string v = str(f);
    try {
      size_t used = 0;
      long long x = std::stoll(v, &used);
      if (used == v.size()) return x;
    } catch (const std::exception&) {
    }
    fail("{} expects an integer, got '{}'", f, v);
  }
  double real(const std::string& f, double def) const {
    if (!values_.count(f)) return def;
    const std::string v = str(f);
    try {
      size_t used = 0;
      double x = std::stod(v, &used);
      if (used == v.size()) return x;
    } catch (const std::exception&) {
    }
    fail("{} expects a number, got '{}'", f, v);
  }
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  std::string usage_;
  std::map<std::string, std::vector<std::string>> values_;
  std::set<std::string> switches_;
  std::vector<std::string> positional_;
};

}  // namespace llama3::cli
