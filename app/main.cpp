// q3vl command-line entry point: global options (--version, --debug, --help), then the subcommand, whose
// errors become one line and an exit code (app/cli.h: 0 ok, 1 runtime error, 2 usage error).
// `pack` and `tokenize` live in the q3vl-pack program beside this one (pack_main.cpp): q3vl links no media
// library (FFmpeg, image codecs, PCRE2, ICU; io/CMakeLists.txt), so it runs on nodes that lack them, and
// `q3vl pack ...` replaces this process with `q3vl-pack pack ...` (exec keeps the environment, so under
// mpirun/srun the ranks become q3vl-pack ranks).
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <system_error>
#include <vector>

#include <unistd.h>

#include "app/cli.h"
#include "app/commands.h"
#include "app/simd.h"  // linking it brings in the start-up instruction-set check, which runs before main
#include "app/version.h"

namespace {

constexpr const char* kCommands =
    "Commands (q3vl COMMAND --help for each one's options):\n"
    "  train CONFIG.yaml [--set key.path=value ...] [--print-config] [--dry-run]\n"
    "        train (the YAML schema: docs/config.md; examples: jobs/configs/)\n"
    "  convert --checkpoint DIR --out HF_DIR [--dtype bf16|f16|f32] [--shard-mb MB] [--tokenizer FILE_OR_DIR]\n"
    "        a training checkpoint -> a Hugging Face model folder\n"
    "  selfcheck [--steps N] [--tokens N]\n"
    "        train a tiny MoE layer stack for N SGD steps, with timings\n"
    "  forward --model HF_DIR --batch IN.h5 --out OUT.h5\n"
    "        fp32 forward: logits, loss, aux_loss\n"
    "  plan --model FLAVOR_OR_DIR [--tokens N] [--seq-len S] [--images N] [--patches-per-image P]\n"
    "       [--dp N] [--fsdp N] [--ep N] [--tp N]\n"
    "        parameters, FLOPs, per-rank memory and communication of a layout\n"
    "  pack --input FILE.json[l] [--input ...] --tokenizer FILE_OR_DIR --out DIR [--overwrite] [...]\n"
    "        pack samples into HDF5 shards (runs q3vl-pack)\n"
    "  tokenize --tokenizer FILE_OR_DIR [--decode]\n"
    "        text on stdin -> JSON ids, or back (runs q3vl-pack)\n"
    "Errors: exit 1 (runtime) or 2 (usage); Q3VL_DEBUG=1 or --debug adds their source location.\n";

// Runs `q3vl-pack CMD ARGS...` from the folder of the running q3vl in place of this process; returns only on
// failure, with a message naming the path it expected.
int exec_q3vl_pack(const std::string& cmd, const std::vector<std::string>& args) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) {
    std::cerr << "q3vl " << cmd << ": runs the q3vl-pack program beside q3vl, but /proc/self/exe cannot be read ("
              << ec.message() << ")\n";
    return q3vl::app::kExitRuntimeError;
  }
  const std::string pack = (self.parent_path() / "q3vl-pack").string();
  if (::access(pack.c_str(), X_OK) != 0) {
    std::cerr << "q3vl " << cmd << ": runs the q3vl-pack program, expected at " << pack << " (" << std::strerror(errno)
              << "); build it beside q3vl (cmake --build BUILD_DIR --target q3vl-pack)\n";
    return q3vl::app::kExitRuntimeError;
  }
  std::vector<std::string> strings{pack, cmd};
  strings.insert(strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : strings) argv.push_back(s.data());
  argv.push_back(nullptr);
  std::cout.flush();
  ::execv(pack.c_str(), argv.data());
  std::cerr << "q3vl " << cmd << ": cannot run " << pack << ": " << std::strerror(errno) << "\n";
  return q3vl::app::kExitRuntimeError;
}

}  // namespace

int main(int argc, char** argv) {
  namespace app = q3vl::app;
  CLI::App cli("q3vl: trains Qwen3-VL(-MoE) from its Hugging Face checkpoint (built for " +
                   q3vl::app::simd_summary() + ")",
               "q3vl");
  cli.footer(kCommands);
  cli.set_version_flag("--version", std::string("q3vl ") + std::string(q3vl::q3vl_version()) + " (git " +
                                        std::string(q3vl::q3vl_git_commit()) + ")");
  cli.add_flag_callback("--debug", app::enable_debug, "name the source location of errors, let library logs through");
  // Everything from the command's name on is the command's own.
  cli.prefix_command();
  try {
    cli.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << cli.help();
    return app::kExitOk;
  } catch (const CLI::Success& e) {
    return cli.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "q3vl: " << e.what() << " (see q3vl --help)\n";
    return app::kExitUsageError;
  }
  std::vector<std::string> args = cli.remaining();
  if (args.empty()) {
    std::cerr << "q3vl: a command is required (see q3vl --help)\n";
    return app::kExitUsageError;
  }
  const std::string cmd = args.front();
  args.erase(args.begin());
  if (cmd == "pack" || cmd == "tokenize") return exec_q3vl_pack(cmd, args);
  const auto command = [&]() -> int (*)(const std::vector<std::string>&) {
    if (cmd == "train") return app::run_train;
    if (cmd == "convert") return app::run_convert;
    if (cmd == "selfcheck") return app::run_selfcheck;
    if (cmd == "forward") return app::run_forward;
    if (cmd == "plan") return app::run_plan;
    return nullptr;
  }();
  if (command == nullptr) {
    std::cerr << "q3vl: " << (cmd.rfind('-', 0) == 0 ? "unknown option '" : "unknown command '") << cmd
              << "' (see q3vl --help)\n";
    return app::kExitUsageError;
  }
  return app::run_command("q3vl", cmd, [&] { return command(args); });
}
