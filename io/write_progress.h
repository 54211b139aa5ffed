// Progress of long writes: the checkpoint and HF-export writers report every block of bytes they write to the
// observer installed on this thread, if any, so a caller can print progress while a save runs (the trainer
// installs one for each checkpoint and export).
#pragma once

#include <cstdint>
#include <functional>

namespace q3vl::io {

// Called with the bytes written since the observer was installed.
using WriteObserver = std::function<void(uint64_t total_bytes)>;

// Installs `observer` on this thread for the scope's lifetime (scopes nest: the outer one returns after).
class WriteObserverScope {
 public:
  explicit WriteObserverScope(WriteObserver observer);
  ~WriteObserverScope();
  WriteObserverScope(const WriteObserverScope&) = delete;
  WriteObserverScope& operator=(const WriteObserverScope&) = delete;

 private:
  friend void note_bytes_written(uint64_t bytes);
  WriteObserver observer_;
  uint64_t total_ = 0;
  WriteObserverScope* outer_;
};

// What the writers call after writing `bytes`.
void note_bytes_written(uint64_t bytes);

}  // namespace q3vl::io
