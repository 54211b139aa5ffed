// SaveProgress: the write observer (io/write_progress.h) of one checkpoint save or HF export, which prints
// "WHAT: 1.20 GiB written (410.35 MiB/s)" when a save takes long: at most one line per `every_s` seconds, the
// first after `every_s` (the trainer uses 5 s, so quick saves print nothing extra).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

namespace q3vl::app {

class SaveProgress {
 public:
  using Print = std::function<void(const std::string& line)>;
  SaveProgress(std::string what, double every_s, Print print);
  void operator()(uint64_t bytes_written);

 private:
  std::string what_;
  double every_s_;
  Print print_;
  std::chrono::steady_clock::time_point start_, last_;
};

}  // namespace q3vl::app
