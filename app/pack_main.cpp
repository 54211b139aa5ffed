// q3vl-pack: the data-preparation commands of q3vl (pack, tokenize), a program of their own because they link the
// media library q3vl_io_media (FFmpeg, image codecs, PCRE2, ICU; io/CMakeLists.txt) that the training binary must
// not. `q3vl pack ...` and `q3vl tokenize ...` exec `q3vl-pack pack ...` / `q3vl-pack tokenize ...` from q3vl's
// folder (main.cpp), so either spelling works, under mpirun/srun too. Errors and exit codes as q3vl's (app/cli.h).
#include <iostream>
#include <string>
#include <vector>

#include "app/cli.h"
#include "app/commands.h"
#include "app/simd.h"  // linking it brings in the start-up instruction-set check, which runs before main
#include "app/version.h"

int main(int argc, char** argv) {
  namespace app = q3vl::app;
  CLI::App cli("q3vl-pack: the data-preparation commands of q3vl, also run as q3vl pack / q3vl tokenize (built for " +
                   app::simd_summary() + ")",
               "q3vl-pack");
  cli.footer(
      "Commands (q3vl-pack COMMAND --help for each one's options):\n"
      "  pack --input FILE.json[l] [--input ...] --tokenizer FILE_OR_DIR --out DIR [...]\n"
      "        pack samples into HDF5 shards\n"
      "  tokenize --tokenizer FILE_OR_DIR [--decode]\n"
      "        text on stdin -> JSON ids, or back\n");
  cli.set_version_flag("--version", std::string("q3vl-pack ") + std::string(q3vl::q3vl_version()) + " (git " +
                                        std::string(q3vl::q3vl_git_commit()) + ")");
  cli.add_flag_callback("--debug", app::enable_debug, "name the source location of errors, let library logs through");
  cli.prefix_command();
  try {
    cli.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << cli.help();
    return app::kExitOk;
  } catch (const CLI::Success& e) {
    return cli.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "q3vl-pack: " << e.what() << " (see q3vl-pack --help)\n";
    return app::kExitUsageError;
  }
  std::vector<std::string> args = cli.remaining();
  if (args.empty()) {
    std::cerr << "q3vl-pack: a command is required (see q3vl-pack --help)\n";
    return app::kExitUsageError;
  }
  const std::string cmd = args.front();
  args.erase(args.begin());
  if (cmd == "pack") return app::run_command("q3vl", cmd, [&] { return app::run_pack(args); });
  if (cmd == "tokenize") return app::run_command("q3vl", cmd, [&] { return app::run_tokenize(args); });
  std::cerr << "q3vl-pack: unknown command '" << cmd << "' (pack or tokenize; the other commands are q3vl's)\n";
  return app::kExitUsageError;
}
