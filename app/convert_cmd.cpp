// q3vl convert --checkpoint DIR --out HF_DIR [--dtype bf16|f16|f32] [--shard-mb MB] [--tokenizer DIR]:
// a training checkpoint (a step-NNNNNNNN folder, or a run's output folder: its newest complete checkpoint)
// to a Hugging Face folder (hf_export.h), with the router bias of a moe.balance bias run (trainer_state.json) in
// the side file the export describes.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "app/cli_args.h"
#include "app/commands.h"
#include "app/hf_export.h"
#include "core/check.h"
#include "io/model_io.h"
#include "io/train_checkpoint.h"

namespace q3vl::app {

namespace fs = std::filesystem;

int run_convert(const std::vector<std::string>& args) {
  const CliArgs a(args, "convert", {"--checkpoint", "--out", "--dtype", "--shard-mb", "--tokenizer"}, {});
  std::string dir = a.required("--checkpoint");
  if (!fs::exists(fs::path(dir) / "COMPLETE")) {
    const auto latest = io::latest_complete_checkpoint((fs::path(dir) / "checkpoints").string());
    Q3VL_CHECK(latest.has_value(), "convert: '", dir,
               "' is neither a complete checkpoint (no COMPLETE marker) nor a run folder with complete checkpoints");
    dir = latest->path;
  }
  HfExportOptions options;
  const std::string dtype = a.get("--dtype", "bf16");
  Q3VL_CHECK(dtype == "bf16" || dtype == "f16" || dtype == "f32", "convert: --dtype is bf16, f16 or f32, got '", dtype, "'");
  options.dtype = dtype == "bf16" ? DType::bf16 : dtype == "f16" ? DType::f16 : DType::f32;
  options.max_shard_bytes = static_cast<uint64_t>(a.get_int("--shard-mb", 4096, 1)) << 20;
  options.tokenizer_dir = a.get("--tokenizer", "");
  const auto model = io::load_hf_model((fs::path(dir) / "model").string());
  const std::string out = a.required("--out");
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
