// q3vl command-line entry point: dispatches subcommands and turns errors into a message and exit code 1.
#include <cstring>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "app/commands.h"
#include "app/simd.h"  // linking it brings in the start-up instruction-set check, which runs before main

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
                 "  pack --input F --tokenizer T --out DIR [...]   pack samples into HDF5 shards\n"
                 "  tokenize --tokenizer tokenizer.json [--decode]   text on stdin -> JSON ids (or back)\n"
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
    if (cmd == "pack") return q3vl::app::run_pack(args);
    if (cmd == "tokenize") return q3vl::app::run_tokenize(args);
    std::cerr << "q3vl: unknown command '" << cmd << "' (see q3vl --help)\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "q3vl: error: " << e.what() << "\n";
    return 1;
  }
}
