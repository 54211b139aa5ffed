// The per-thread write observer (write_progress.h).
#include "io/write_progress.h"

#include <utility>

namespace q3vl::io {

namespace {

thread_local WriteObserverScope* t_current = nullptr;

}  // namespace

WriteObserverScope::WriteObserverScope(WriteObserver observer) : observer_(std::move(observer)), outer_(t_current) {
  t_current = this;
}

WriteObserverScope::~WriteObserverScope() { t_current = outer_; }

void note_bytes_written(uint64_t bytes) {
  WriteObserverScope* scope = t_current;
  if (scope == nullptr || bytes == 0) return;
  scope->total_ += bytes;
  if (scope->observer_) scope->observer_(scope->total_);
}

}  // namespace q3vl::io
