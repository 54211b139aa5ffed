// q3vl-pack: the data-preparation commands of q3vl (pack, tokenize), a program of their own because they link the
// media library q3vl_io_media (FFmpeg, image codecs, PCRE2, ICU; io/CMakeLists.txt) that the training binary must
// not. `q3vl pack ...` and `q3vl tokenize ...` exec `q3vl-pack pack ...` / `q3vl-pack tokenize ...` from q3vl's
// folder (main.cpp), so either spelling works, under mpirun/srun too.
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "app/commands.h"
#include "app/simd.h"  // linking it brings in the start-up instruction-set check, which runs before main

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::cout << "usage: q3vl-pack <command> [options]   (also run as q3vl pack / q3vl tokenize)\n"
                 "commands:\n"
                 "  pack --input F --tokenizer T --out DIR [...]   pack samples into HDF5 shards\n"
                 "  tokenize --tokenizer tokenizer.json [--decode]   text on stdin -> JSON ids (or back)\n"
                 "built for: " << q3vl::app::simd_summary() << "\n";
    return args.empty() ? 1 : 0;
  }
  try {
    const std::string cmd = args[0];
    args.erase(args.begin());
    if (cmd == "pack") return q3vl::app::run_pack(args);
    if (cmd == "tokenize") return q3vl::app::run_tokenize(args);
    std::cerr << "q3vl-pack: unknown command '" << cmd << "' (pack or tokenize; the other commands are q3vl's)\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "q3vl: error: " << e.what() << "\n";
    return 1;
  }
}
