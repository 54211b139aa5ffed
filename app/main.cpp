// q3vl command-line entry point: dispatches subcommands and turns errors into a message and exit code 1.
#include <cstring>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "app/commands.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::cout << "usage: q3vl <command> [options]\n"
                 "commands:\n"
                 "  selfcheck [--steps N] [--tokens N]   train a tiny MoE layer stack for N SGD steps (default 20), with timings\n";
    return args.empty() ? 1 : 0;
  }
  try {
    const std::string cmd = args[0];
    args.erase(args.begin());
    if (cmd == "selfcheck") return q3vl::app::run_selfcheck(args);
    std::cerr << "q3vl: unknown command '" << cmd << "' (see q3vl --help)\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "q3vl: error: " << e.what() << "\n";
    return 1;
  }
}
