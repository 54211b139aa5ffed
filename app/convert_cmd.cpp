// q3vl convert --checkpoint DIR --out HF_DIR [--dtype bf16|f16|f32] [--shard-mb MB] [--tokenizer DIR]:
// a training checkpoint (a step-NNNNNNNN folder, or a run's output folder: its newest complete checkpoint)
// to a Hugging Face folder (hf_export.h), with the router bias of a moe.balance bias run (trainer_state.json) in
// the side file the export describes.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "app/cli.h"
#include "app/commands.h"
#include "app/hf_export.h"
#include "core/check.h"
#include "io/model_io.h"
#include "io/tokenizer_path.h"
#include "io/train_checkpoint.h"

namespace q3vl::app {

namespace fs = std::filesystem;

int run_convert(const std::vector<std::string>& args) {
  auto cli = make_command("convert", "A training checkpoint (a step-NNNNNNNN folder, or a run's output folder: its "
                                    "newest complete checkpoint) to a Hugging Face model folder.");
  std::string dir, out, dtype = "bf16", tokenizer;
  int64_t shard_mb = 4096;
  cli->add_option("--checkpoint", dir, "checkpoint folder, or a run's output folder")->required();
  cli->add_option("--out", out, "Hugging Face folder to write")->required();
  cli->add_option("--dtype", dtype, "weights' dtype in the export")->check(CLI::IsMember({"bf16", "f16", "f32"}))
      ->capture_default_str();
  add_int_option(*cli, "--shard-mb", shard_mb, 1, "safetensors shard size in MiB");
  cli->add_option("--tokenizer", tokenizer, "tokenizer.json or its folder: its tokenizer files are copied into the export");
  if (const auto done = parse_command(*cli, args)) return *done;
  if (!fs::exists(fs::path(dir) / "COMPLETE")) {
    const auto latest = io::latest_complete_checkpoint((fs::path(dir) / "checkpoints").string());
    Q3VL_CHECK(latest.has_value(), "convert: '", dir,
               "' is neither a complete checkpoint (no COMPLETE marker) nor a run folder with complete checkpoints");
    dir = latest->path;
  }
  HfExportOptions options;
  options.dtype = dtype == "bf16" ? DType::bf16 : dtype == "f16" ? DType::f16 : DType::f32;
  options.max_shard_bytes = static_cast<uint64_t>(shard_mb) << 20;
  if (!tokenizer.empty()) options.tokenizer_dir = io::resolve_tokenizer_dir(tokenizer, "--tokenizer");
  const auto model = io::load_hf_model((fs::path(dir) / "model").string());
  std::ifstream state_file(fs::path(dir) / "trainer_state.json");
  const nlohmann::json state = nlohmann::json::parse(state_file, nullptr, false);
  Q3VL_CHECK(!state.is_discarded(), "convert: '", dir, "/trainer_state.json' is missing or not valid JSON");
  std::vector<float> bias;
  if (state.contains("router_bias")) {
    for (const auto& row : state.at("router_bias"))
      for (const double v : row.get<std::vector<double>>()) bias.push_back(static_cast<float>(v));
    const int64_t layers = model->config().num_moe_layers();
    // export_hf checks the shape against the model config.
    const int64_t per_layer = static_cast<int64_t>(bias.size()) / std::max<int64_t>(layers, 1);
    options.router_bias = Tensor(bias.data(), DType::f32, {layers, per_layer});
  }
  export_hf(out, *model, options);
  std::cout << "converted " << dir << " -> " << out << " (" << dtype << ")\n";
  if (options.router_bias.defined()) std::cerr << router_bias_warning(out) << "\n";
  return 0;
}

}  // namespace q3vl::app
