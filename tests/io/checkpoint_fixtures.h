// Helpers the checkpoint tests share: a tiny flavor with a small vocabulary, a folder's entries, the complete
// checkpoint steps under a root.
#pragma once

#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "core/model/config.h"
#include "io/hf_config.h"
#include "io/train_checkpoint.h"

namespace q3vl::io::test_fixtures {

// `flavor` with a 512-token vocabulary (special tokens moved inside it), so a save writes ~1 MB per field
// instead of the 151936-row embedding tables.
inline ModelConfig small_vocab(const std::string& flavor) {
  ModelConfig c = load_model_config(flavor);
  c.text.vocab_size = 512;
  c.image_token_id = 500;
  c.video_token_id = 501;
  c.vision_start_token_id = 502;
  c.vision_end_token_id = 503;
  return c;
}

inline std::set<std::string> dir_entries(const std::string& dir) {
  std::set<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

inline std::vector<int64_t> complete_steps(const std::string& root) {
  std::vector<int64_t> out;
  for (const CheckpointEntry& e : list_complete_checkpoints(root)) out.push_back(e.step);
  return out;
}

}  // namespace q3vl::io::test_fixtures
