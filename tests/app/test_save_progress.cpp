// Progress of long saves: the write observer sees every byte a checkpoint or export writer writes, scopes nest,
// and SaveProgress prints throttled lines with the bytes and the rate.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "app/save_progress.h"
#include "io/checkpoint_files.h"
#include "io/safetensors.h"
#include "io/write_progress.h"
#include "tests/support/test_files.h"

namespace q3vl::app {
namespace {

TEST(SaveProgress, ObserverSeesEveryByteOfASafetensorsFile) {
  test::TempDir tmp;
  std::vector<float> values(3000, 1.5f);
  const std::string path = tmp / "t.safetensors";
  uint64_t seen = 0, outer_seen = 0;
  {
    const io::WriteObserverScope outer([&](uint64_t total) { outer_seen = total; });
    {
      const io::WriteObserverScope inner([&](uint64_t total) { seen = total; });
      io::write_safetensors_file(path, {{"w", Tensor(values.data(), DType::f32, {3000})}}, DType::f32);
    }
    EXPECT_EQ(seen, std::filesystem::file_size(path)) << "every byte of the file, header included";
    EXPECT_EQ(outer_seen, 0u) << "the inner scope takes the writes while it lives";
    io::write_safetensors_file(path, {{"w", Tensor(values.data(), DType::f32, {10})}}, DType::f32);
  }
  EXPECT_EQ(outer_seen, std::filesystem::file_size(path)) << "the second file, written after the inner scope ended";
  EXPECT_GT(outer_seen, 10u * sizeof(float));
  io::note_bytes_written(100);  // no scope: ignored

  uint64_t checkpoint_bytes = 0;
  const io::WriteObserverScope scope([&](uint64_t total) { checkpoint_bytes = total; });
  io::checkpoint_files::write_text_file(tmp / "state.json", std::string(777, 'x'));
  EXPECT_EQ(checkpoint_bytes, 777u) << "the checkpoints' durable writes report too";
}

TEST(SaveProgress, PrintsBytesAndRateAtMostOncePerInterval) {
  std::vector<std::string> lines;
  SaveProgress every_call("checkpoint step 3", 0.0, [&](const std::string& l) { lines.push_back(l); });
  every_call(1536);
  every_call(3u << 20);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0].rfind("checkpoint step 3: 1.50 KiB written (", 0), 0u) << lines[0];
  EXPECT_EQ(lines[1].rfind("checkpoint step 3: 3.00 MiB written (", 0), 0u) << lines[1];
  EXPECT_NE(lines[1].find("/s)"), std::string::npos) << lines[1];

  lines.clear();
  SaveProgress rarely("export", 3600.0, [&](const std::string& l) { lines.push_back(l); });
  rarely(1 << 20);
  rarely(2 << 20);
  EXPECT_TRUE(lines.empty()) << "a quick save prints nothing extra";
}

}  // namespace
}  // namespace q3vl::app
