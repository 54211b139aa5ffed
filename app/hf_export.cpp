// HF folder export (hf_export.h).
#include "app/hf_export.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "app/version.h"
#include "core/check.h"
#include "io/model_io.h"
#include "io/safetensors.h"

namespace q3vl::app {

namespace fs = std::filesystem;

const std::vector<std::string>& tokenizer_file_names() {
  static const std::vector<std::string> names = {
      "tokenizer.json",       "tokenizer_config.json",        "special_tokens_map.json", "vocab.json", "merges.txt",
      "chat_template.json",   "chat_template.jinja",          "preprocessor_config.json",
      "video_preprocessor_config.json", "generation_config.json"};
  return names;
}

std::string router_bias_warning(const std::string& dir) {
  return "warning: the HF model has no router score bias (moe.balance: bias | aux+bias), so its routing at inference "
         "differs from training; the bias is in " + (fs::path(dir) / kRouterBiasFile).string() +
         " (add it to the router's softmax probabilities when choosing the top-k experts)";
}

namespace {

void write_router_bias(const fs::path& file, const ModelConfig& config, const Tensor& bias) {
  const int64_t experts = config.text.num_experts;
  Q3VL_CHECK(bias.dtype() == DType::f32 && bias.ndim() == 2 && bias.size(0) == config.num_moe_layers() &&
                 bias.size(1) == experts,
             "export: the router bias is ", bias.str(), ", expected f32 [", config.num_moe_layers(), ", ", experts, "]");
  std::vector<io::StWriteEntry> entries;
  int64_t row = 0;
  for (int l = 0; l < config.text.num_hidden_layers; ++l) {
    if (!config.is_moe_layer(l)) continue;
    entries.push_back({"model.language_model.layers." + std::to_string(l) + ".mlp.gate.score_bias",
                       bias.narrow(0, row++, 1).view({experts})});
  }
  io::write_safetensors_file(file.string(), entries, DType::f32);
}

// Records which q3vl wrote the folder in its config.json ("q3vl_version", beside HF's "transformers_version";
// transformers keeps unknown keys as attributes, and q3vl's reader accepts it).
void stamp_producer(const std::string& config_path) {
  std::ifstream in(config_path);
  Q3VL_CHECK(in, "export: cannot read '", config_path, "'");
  nlohmann::json config = nlohmann::json::parse(in);
  config["q3vl_version"] = std::string(q3vl_version()) + " (git " + std::string(q3vl_git_commit()) + ")";
  std::ofstream out(config_path, std::ios::trunc);
  out << config.dump(2) << "\n";
  Q3VL_CHECK(out.flush(), "export: cannot write '", config_path, "'");
}

}  // namespace

void export_hf(const std::string& dir, const Model& model, const HfExportOptions& options) {
  const fs::path target(dir);
  const fs::path tmp = target.string() + ".tmp-" + std::to_string(::getpid());
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  Q3VL_CHECK(!ec, "export: cannot create '", tmp.string(), "': ", ec.message());
  try {
    const io::WeightLookup whole = [&](const std::string& key) { return model.weights().at(key); };
    io::save_hf_checkpoint(tmp.string(), model.config(), options.lookup ? options.lookup : whole, options.dtype,
                           options.max_shard_bytes, options.before_write);
    stamp_producer((tmp / "config.json").string());
    if (options.router_bias.defined()) write_router_bias(tmp / kRouterBiasFile, model.config(), options.router_bias);
    if (!options.tokenizer_dir.empty()) {
      const fs::path src(options.tokenizer_dir);
      Q3VL_CHECK(fs::exists(src / "tokenizer.json"), "export.tokenizer: '", options.tokenizer_dir,
                 "' has no tokenizer.json");
      for (const std::string& name : tokenizer_file_names()) {
        if (!fs::exists(src / name)) continue;
        fs::copy_file(src / name, tmp / name, fs::copy_options::overwrite_existing, ec);
        Q3VL_CHECK(!ec, "export: cannot copy '", (src / name).string(), "': ", ec.message());
      }
    }
    fs::remove_all(target, ec);
    fs::rename(tmp, target, ec);
    Q3VL_CHECK(!ec, "export: cannot rename '", tmp.string(), "' to '", dir, "': ", ec.message());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

}  // namespace q3vl::app
