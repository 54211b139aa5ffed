// Multi-rank progress watchdog (watchdog.h).
#include "app/watchdog.h"

#include <cstdio>
#include <unistd.h>

namespace q3vl::app {

Watchdog::Watchdog(double timeout_s, int rank) : timeout_s_(timeout_s), rank_(rank) {
  last_ = "start";
  last_time_ = std::chrono::steady_clock::now();
  if (timeout_s_ > 0) thread_ = std::thread([this] { watch(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::beat(const std::string& what) {
  if (timeout_s_ <= 0) return;
  std::lock_guard<std::mutex> lock(mutex_);
  last_ = what;
  last_time_ = std::chrono::steady_clock::now();
}

void Watchdog::watch() {
  const auto timeout = std::chrono::duration<double>(timeout_s_);
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    const auto deadline = last_time_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(timeout);
    if (std::chrono::steady_clock::now() >= deadline) {
      std::fprintf(stderr,
                   "rank %d: no progress for %.0f s (last: %s); a collective is waiting for a rank that failed or "
                   "hangs, ending the job\n",
                   rank_, timeout_s_, last_.c_str());
      std::fflush(stderr);
      // _exit: the main thread is blocked inside MPI; no destructor may run into it.
      ::_exit(3);
    }
    wake_.wait_until(lock, deadline);
  }
}

}  // namespace q3vl::app
