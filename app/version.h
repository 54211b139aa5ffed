// The version of q3vl (CMake's project VERSION) and the git commit it was built from (`git rev-parse --short
// HEAD` at configure time, "unknown" outside a git checkout), for --version and the records a run writes.
#pragma once

#include <string_view>

namespace q3vl {

std::string_view q3vl_version();
std::string_view q3vl_git_commit();

}  // namespace q3vl
