// A watchdog for multi-rank runs: MPI collectives block forever when another rank died without taking the job
// down or hangs. The trainer beats the watchdog at every phase of a step; when no beat comes for `timeout`
// seconds the watchdog prints "rank R: no progress for T s (last: WHAT)" to stderr and ends the process with exit
// code 3, which makes mpirun / srun end every other rank of the job.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

namespace q3vl::app {

class Watchdog {
 public:
  // timeout_s <= 0: no watchdog thread (beats are free).
  Watchdog(double timeout_s, int rank);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Progress: restarts the timeout; `what` names the phase for the message.
  void beat(const std::string& what);

 private:
  void watch();

  double timeout_s_;
  int rank_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::string last_;
  std::chrono::steady_clock::time_point last_time_;
  std::thread thread_;
};

}  // namespace q3vl::app
