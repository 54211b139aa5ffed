// Minimal option parsing for q3vl subcommands: "--name value" pairs and bare "--flag"s, each validated
// against the command's known options; unknown or repeated options and missing values are errors.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace q3vl::app {

class CliArgs {
 public:
  CliArgs(const std::vector<std::string>& args, std::string command, std::set<std::string> valued,
          std::set<std::string> flags);
  bool has(const std::string& name) const;
  std::string required(const std::string& name) const;
  std::string get(const std::string& name, const std::string& fallback) const;
  int64_t get_int(const std::string& name, int64_t fallback, int64_t min_value) const;

 private:
  std::string command_;
  std::map<std::string, std::string> values_;
};

}  // namespace q3vl::app
