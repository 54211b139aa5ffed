// HF folder export (hf_export.h).
#include "app/hf_export.h"

#include <filesystem>
#include <unistd.h>

#include "core/check.h"
#include "io/model_io.h"

namespace q3vl::app {

namespace fs = std::filesystem;

const std::vector<std::string>& tokenizer_file_names() {
  static const std::vector<std::string> names = {
      "tokenizer.json",       "tokenizer_config.json",        "special_tokens_map.json", "vocab.json", "merges.txt",
      "chat_template.json",   "chat_template.jinja",          "preprocessor_config.json",
      "video_preprocessor_config.json", "generation_config.json"};
  return names;
}

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
