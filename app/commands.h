// Subcommands of the q3vl CLI; each takes the arguments after its name and returns the exit code.
#pragma once

#include <string>
#include <vector>

namespace q3vl::app {

int run_selfcheck(const std::vector<std::string>& args);
int run_forward(const std::vector<std::string>& args);
int run_plan(const std::vector<std::string>& args);
// In the q3vl-pack program (pack_main.cpp), which links the media library; q3vl execs it for these two.
int run_pack(const std::vector<std::string>& args);
int run_tokenize(const std::vector<std::string>& args);
int run_train(const std::vector<std::string>& args);
int run_convert(const std::vector<std::string>& args);

}  // namespace q3vl::app
