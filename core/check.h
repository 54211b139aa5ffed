// Q3VL_CHECK: the one error style of q3vl. A failed check throws q3vl::Error, whose message (what()) carries the
// caller's context (layer, tensor names and shapes, file, key) and whose location() names the source file and
// line apart from it, so a user sees the message and a developer can still ask for where it came from.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace q3vl {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, std::string location = {})
      : std::runtime_error(message), location_(std::move(location)) {}
  // "core/foo.cpp:12" for a failed check; empty for an Error thrown by hand.
  const std::string& location() const { return location_; }

 private:
  std::string location_;
};

namespace detail {
template <class... Args>
[[noreturn]] void throw_error(const char* file, int line, const char* cond, const Args&... args) {
  std::ostringstream os;
  if constexpr (sizeof...(Args) > 0) {
    (os << ... << args);
  } else {
    os << "check failed: " << cond;
  }
  throw Error(os.str(), std::string(file) + ":" + std::to_string(line));
}
}  // namespace detail

}  // namespace q3vl

#define Q3VL_CHECK(cond, ...)                                                     \
  do {                                                                            \
    if (!(cond)) [[unlikely]]                                                     \
      ::q3vl::detail::throw_error(__FILE__, __LINE__, #cond __VA_OPT__(, ) __VA_ARGS__); \
  } while (0)

#define Q3VL_FAIL(...) ::q3vl::detail::throw_error(__FILE__, __LINE__, "" __VA_OPT__(, ) __VA_ARGS__)
