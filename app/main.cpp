// q3vl command-line entry point: dispatches subcommands and turns errors into a message and exit code 1.
// `pack` and `tokenize` live in the q3vl-pack program beside this one (pack_main.cpp): q3vl links no media
// library (FFmpeg, image codecs, PCRE2, ICU; io/CMakeLists.txt), so it runs on nodes that lack them, and
// `q3vl pack ...` replaces this process with `q3vl-pack pack ...` (exec keeps the environment, so under
// mpirun/srun the ranks become q3vl-pack ranks).
#include <cerrno>
#include <cstring>
#include <exception>
#include <filesystem>
#include <iostream>
#include <string>
#include <system_error>
#include <vector>

#include <unistd.h>

#include "app/commands.h"
#include "app/simd.h"  // linking it brings in the start-up instruction-set check, which runs before main

namespace {

// Runs `q3vl-pack CMD ARGS...` from the folder of the running q3vl in place of this process; returns only on
// failure, with a message naming the path it expected.
int exec_q3vl_pack(const std::string& cmd, const std::vector<std::string>& args) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) {
    std::cerr << "q3vl: error: " << cmd << " runs the q3vl-pack program beside q3vl, but /proc/self/exe cannot be read ("
              << ec.message() << ")\n";
    return 1;
  }
  const std::string pack = (self.parent_path() / "q3vl-pack").string();
  if (::access(pack.c_str(), X_OK) != 0) {
    std::cerr << "q3vl: error: " << cmd << " runs the q3vl-pack program, expected at " << pack << " ("
              << std::strerror(errno) << "); build it beside q3vl (cmake --build BUILD_DIR --target q3vl-pack)\n";
    return 1;
  }
  std::vector<std::string> strings{pack, cmd};
  strings.insert(strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : strings) argv.push_back(s.data());
  argv.push_back(nullptr);
  std::cout.flush();
  ::execv(pack.c_str(), argv.data());
  std::cerr << "q3vl: error: cannot run " << pack << ": " << std::strerror(errno) << "\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::cout << "usage: q3vl <command> [options]\n"
                 "commands:\n"
                 "  train CONFIG.yaml [--set key=value ...]   train (config: app/train_config.h, jobs/configs/)\n"
                 "  convert --checkpoint DIR --out HF_DIR [--dtype bf16] [--tokenizer DIR]   checkpoint -> HF folder\n"
                 "  selfcheck [--steps N] [--tokens N]   train a tiny MoE layer stack for N SGD steps (default 20), with timings\n"
                 "  forward --model HF_DIR --batch IN.h5 --out OUT.h5   fp32 forward: logits, loss, aux_loss\n"
                 "  plan --model FLAVOR_OR_DIR [--tokens N] [--seq-len S] [--patches-per-image P]   sizes, FLOPs, memory\n"
                 "  pack --input F --tokenizer T --out DIR [...]   pack samples into HDF5 shards (runs q3vl-pack)\n"
                 "  tokenize --tokenizer tokenizer.json [--decode]   text on stdin -> JSON ids (or back; runs q3vl-pack)\n"
                 "built for: " << q3vl::app::simd_summary() << "\n";
    return args.empty() ? 1 : 0;
  }
  try {
    const std::string cmd = args[0];
    args.erase(args.begin());
    if (cmd == "train") return q3vl::app::run_train(args);
    if (cmd == "convert") return q3vl::app::run_convert(args);
    if (cmd == "selfcheck") return q3vl::app::run_selfcheck(args);
    if (cmd == "forward") return q3vl::app::run_forward(args);
    if (cmd == "plan") return q3vl::app::run_plan(args);
    if (cmd == "pack" || cmd == "tokenize") return exec_q3vl_pack(cmd, args);
    std::cerr << "q3vl: unknown command '" << cmd << "' (see q3vl --help)\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "q3vl: error: " << e.what() << "\n";
    return 1;
  }
}
