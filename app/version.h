// The version of q3vl and the git commit it was built from (written at configure time).
#pragma once

#include <string_view>

namespace q3vl::app {

std::string_view q3vl_version();
std::string_view q3vl_git_commit();

}  // namespace q3vl::app
