// CliArgs: validated "--name value" parsing.
#include "app/cli_args.h"

#include <utility>

#include "core/check.h"

namespace q3vl::app {

CliArgs::CliArgs(const std::vector<std::string>& args, std::string command, std::set<std::string> valued,
                 std::set<std::string> flags)
    : command_(std::move(command)) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    Q3VL_CHECK(valued.count(a) || flags.count(a), command_, ": unknown option '", a, "'");
    Q3VL_CHECK(!values_.count(a), command_, ": option ", a, " given twice");
    if (flags.count(a)) {
      values_[a] = "";
      continue;
    }
    Q3VL_CHECK(i + 1 < args.size(), command_, ": option ", a, " needs a value");
    values_[a] = args[++i];
  }
}

bool CliArgs::has(const std::string& name) const { return values_.count(name) > 0; }

std::string CliArgs::required(const std::string& name) const {
  auto it = values_.find(name);
  Q3VL_CHECK(it != values_.end(), command_, ": missing required option ", name);
  return it->second;
}

std::string CliArgs::get(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

int64_t CliArgs::get_int(const std::string& name, int64_t fallback, int64_t min_value) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(it->second, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  Q3VL_CHECK(used == it->second.size() && v >= min_value, command_, ": ", name, " expects an integer >= ", min_value,
             ", got '", it->second, "'");
  return v;
}

}  // namespace q3vl::app
