// Arena: one aligned allocation sized up front, carved by a bump pointer. Parameters, gradients,
// optimizer states and activations live in arenas so the step loop never allocates; exhausting an arena
// is an error naming it, never a silent growth. mark()/release() give stack-like scratch space.
#pragma once

#include <cstddef>
#include <string>

#include "core/dtype.h"

namespace q3vl {

class Arena {
 public:
  static constexpr size_t kAlign = 64;
  // Host arenas from this size on are reserved address space whose pages are committed when first written.
  static constexpr size_t kReserveFrom = size_t{1} << 20;

  Arena(std::string name, size_t capacity_bytes, Device device = Device::cpu);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Returns kAlign-aligned, uninitialised memory of `bytes` bytes.
  void* allocate(size_t bytes);

  size_t mark() const { return used_; }
  void release(size_t mark);  // frees everything allocated after mark()
  void reset() { release(0); }

  const std::string& name() const { return name_; }
  Device device() const { return device_; }
  size_t capacity() const { return capacity_; }
  size_t used() const { return used_; }
  size_t high_water() const { return high_water_; }

  static size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

 private:
  std::string name_;
  Device device_;
  size_t capacity_;
  size_t used_ = 0;
  size_t high_water_ = 0;
  void* base_ = nullptr;
  bool mapped_ = false;
};

}  // namespace q3vl
