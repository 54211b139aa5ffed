// Q3VL_CHECK: the one error style of q3vl. A failed check throws q3vl::Error whose message names the
// source file and line and carries the caller's context (layer, tensor names and shapes, file, key).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace q3vl {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Args>
[[noreturn]] void throw_error(const char* file, int line, const char* cond, const Args&... args) {
  std::ostringstream os;
  os << file << ":" << line << ": ";
  if constexpr (sizeof...(Args) > 0) {
    (os << ... << args);
  } else {
    os << "check failed: " << cond;
  }
  throw Error(os.str());
}
}  // namespace detail

}  // namespace q3vl

#define Q3VL_CHECK(cond, ...)                                                     \
  do {                                                                            \
    if (!(cond)) [[unlikely]]                                                     \
      ::q3vl::detail::throw_error(__FILE__, __LINE__, #cond __VA_OPT__(, ) __VA_ARGS__); \
  } while (0)

#define Q3VL_FAIL(...) ::q3vl::detail::throw_error(__FILE__, __LINE__, "" __VA_OPT__(, ) __VA_ARGS__)
