// What every q3vl command line shares (CLI11): a command's option parser, -h/--help (full usage on stdout, exit
// 0), --debug, usage errors (one line on stderr naming the option, exit 2) and runtime errors (one line
// `q3vl CMD: message`, exit 1; the source location of a failed check only when debugging).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace q3vl::app {

inline constexpr int kExitOk = 0;
inline constexpr int kExitRuntimeError = 1;
inline constexpr int kExitUsageError = 2;

// A wrong command line found after parsing (a missing argument, a combination of options that does not go
// together): reported like CLI11's own usage errors.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The parser of `q3vl COMMAND`, with --debug (as Q3VL_DEBUG=1) besides -h/--help.
std::unique_ptr<CLI::App> make_command(const std::string& command, const std::string& description);

// Parses `args` (the words after the command's name) into the options of `app`. Returns the exit code when the
// command must end here: 0 after --help (usage printed to stdout); a usage error throws UsageError.
std::optional<int> parse_command(CLI::App& app, const std::vector<std::string>& args);

// An integer option; a value that is not an integer >= `min_value` is a usage error
// "NAME expects an integer >= MIN, got 'VALUE'".
CLI::Option* add_int_option(CLI::App& app, const std::string& name, int64_t& value, int64_t min_value,
                            const std::string& help);
// A number option; a value that is not a finite number is a usage error naming the option.
CLI::Option* add_number_option(CLI::App& app, const std::string& name, double& value, const std::string& help);

// Q3VL_DEBUG=1 in the environment or --debug on the command line: errors name their source location and
// libraries' own log lines (FFmpeg) are let through.
bool debug_enabled();
void enable_debug();

// "q3vl COMMAND: message", plus " [core/foo.cpp:12]" for a failed check when debugging. A message that already
// starts with the command's name ("plan: --ep 3 must divide ...", shared with the library's other callers)
// is not prefixed twice.
std::string error_line(const std::string& program, const std::string& command, const std::exception& e);

// Runs one command's body and turns what it throws into one line on stderr and the exit code: 2 for a usage
// error (with a pointer to the command's --help), 1 for anything else.
int run_command(const std::string& program, const std::string& command, const std::function<int()>& body);

}  // namespace q3vl::app
