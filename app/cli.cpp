// The shared command-line plumbing of q3vl's commands (cli.h): CLI11 parsers, usage and error lines, exit codes.
#include "app/cli.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <iostream>

#include "core/check.h"

namespace q3vl::app {

namespace {

// __FILE__ is the source's absolute path, or a path relative to the build folder when ccache's CCACHE_BASEDIR
// rewrote it ("../../io/x.cpp"); a location reads better relative to the project.
std::string relative_location(std::string location) {
  const std::string prefix = Q3VL_SOURCE_PREFIX;
  if (location.rfind(prefix, 0) == 0) return location.substr(prefix.size());
  while (location.rfind("../", 0) == 0) location.erase(0, 3);
  return location;
}

// The usage error of the first word no option took, if any.
std::optional<std::string> stray_word(const CLI::App& app) {
  const std::vector<std::string> extra = app.remaining();
  if (extra.empty()) return std::nullopt;
  const std::string& word = extra.front();
  return word.rfind('-', 0) == 0 && word.size() > 1 ? "unknown option '" + word + "'"
                                                   : "unexpected argument '" + word + "'";
}

}  // namespace

std::unique_ptr<CLI::App> make_command(const std::string& command, const std::string& description) {
  auto app = std::make_unique<CLI::App>(description, "q3vl " + command);
  app->add_flag_callback("--debug", enable_debug, "name the source location of errors, let library logs through");
  // Unknown options and stray words are reported by parse_command, one line naming the first of them.
  app->allow_extras();
  return app;
}

std::optional<int> parse_command(CLI::App& app, const std::vector<std::string>& args) {
  std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 takes its words last first
  try {
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return kExitOk;
  } catch (const CLI::ParseError& e) {
    // A misspelt option also leaves a required one missing: name the misspelling, the cause.
    throw UsageError(stray_word(app).value_or(e.what()));
  }
  if (const auto stray = stray_word(app)) throw UsageError(*stray);
  return std::nullopt;
}

CLI::Option* add_int_option(CLI::App& app, const std::string& name, int64_t& value, int64_t min_value,
                            const std::string& help) {
  const auto parse = [&value, name, min_value](const std::string& text) {
    int64_t v = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc() || end != text.data() + text.size() || v < min_value)
      throw CLI::ValidationError(name + " expects an integer >= " + std::to_string(min_value) + ", got '" + text + "'");
    value = v;
  };
  return app.add_option_function<std::string>(name, parse, help)->type_name("INT")->default_str(std::to_string(value));
}

CLI::Option* add_number_option(CLI::App& app, const std::string& name, double& value, const std::string& help) {
  const auto parse = [&value, name](const std::string& text) {
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (text.empty() || end != text.c_str() + text.size() || !std::isfinite(v))
      throw CLI::ValidationError(name + " expects a number, got '" + text + "'");
    value = v;
  };
  std::ostringstream shown;
  shown << value;
  return app.add_option_function<std::string>(name, parse, help)->type_name("NUMBER")->default_str(shown.str());
}

bool debug_enabled() {
  const char* env = std::getenv("Q3VL_DEBUG");
  return env != nullptr && std::string(env) == "1";
}

// Through the environment, so the libraries' log settings (io/video.cpp) and q3vl-pack, which q3vl execs, see it.
void enable_debug() { ::setenv("Q3VL_DEBUG", "1", 1); }

std::string error_line(const std::string& program, const std::string& command, const std::exception& e) {
  const std::string message = e.what();
  const bool named = message.rfind(command + ":", 0) == 0 || message.rfind(command + " ", 0) == 0;
  std::string line = program + (named ? " " : " " + command + ": ") + message;
  if (const auto* error = dynamic_cast<const Error*>(&e); error != nullptr && debug_enabled() && !error->location().empty())
    line += " [" + relative_location(error->location()) + "]";
  return line;
}

int run_command(const std::string& program, const std::string& command, const std::function<int()>& body) {
  try {
    return body();
  } catch (const UsageError& e) {
    std::cerr << program << " " << command << ": " << e.what() << " (see " << program << " " << command
              << " --help)\n";
    return kExitUsageError;
  } catch (const std::exception& e) {
    std::cerr << error_line(program, command, e) << "\n";
    return kExitRuntimeError;
  }
}

}  // namespace q3vl::app
