// Progress lines of long saves (save_progress.h).
#include "app/save_progress.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "core/human_units.h"

namespace q3vl::app {

SaveProgress::SaveProgress(std::string what, double every_s, Print print)
    : what_(std::move(what)), every_s_(every_s), print_(std::move(print)), start_(std::chrono::steady_clock::now()),
      last_(start_) {}

void SaveProgress::operator()(uint64_t bytes_written) {
  const auto now = std::chrono::steady_clock::now();
  if (std::chrono::duration<double>(now - last_).count() < every_s_) return;
  last_ = now;
  const double seconds = std::max(std::chrono::duration<double>(now - start_).count(), 1e-9);
  const double bytes = static_cast<double>(bytes_written);
  print_(what_ + ": " + human_bytes(bytes) + " written (" + human_bytes(bytes / seconds) + "/s)");
}

}  // namespace q3vl::app
