// Parameter counts of every named flavor (jobs/flavors) against Hugging Face's num_parameters(), as
// recorded by the pinned golden generator in tests/golden/hf_param_counts.json (counted on the meta device).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>

#include "core/model/param_specs.h"
#include "io/hf_config.h"

namespace q3vl::test {
namespace {

TEST(Plan, ParameterCountsEqualHuggingFaceForEveryNamedFlavor) {
  std::ifstream in(std::string(Q3VL_SOURCE_DIR) + "/tests/golden/hf_param_counts.json");
  ASSERT_TRUE(in.good());
  const nlohmann::json counts = nlohmann::json::parse(in);
  int checked = 0;
  for (const auto& [name, entry] : counts.at("flavors").items()) {
    const std::string flavor = name.substr(std::string("Qwen3-VL-").size());
    const ModelConfig cfg = io::load_model_config(flavor);
    EXPECT_EQ(count_parameters(cfg), entry.at("num_parameters").get<int64_t>()) << flavor;
    EXPECT_EQ(count_vision_parameters(cfg), entry.at("vision_parameters").get<int64_t>()) << flavor;
    ++checked;
  }
  EXPECT_EQ(checked, 6);  // 2B, 4B, 8B, 32B, 30B-A3B, 235B-A22B
}

TEST(Plan, ThirtyBA3BHasThePublishedParameterCount) {
  // HF Qwen3VLMoeForConditionalGeneration(config of Qwen3-VL-30B-A3B-Instruct).num_parameters().
  EXPECT_EQ(count_parameters(io::load_model_config("30B-A3B")), 31070754032);
}

}  // namespace
}  // namespace q3vl::test
