// Arena implementation (CPU memory; the CUDA backend adds device allocation).
#include "core/arena.h"

#include <cstdlib>

#include "core/check.h"

namespace q3vl {

Arena::Arena(std::string name, size_t capacity_bytes, Device device)
    : name_(std::move(name)), device_(device), capacity_(aligned(capacity_bytes)) {
  Q3VL_CHECK(device_ == Device::cpu, "arena '", name_, "': device ", device_name(device_),
             " is not built in this binary");
  if (capacity_ > 0) {
    base_ = std::aligned_alloc(kAlign, capacity_);
    Q3VL_CHECK(base_ != nullptr, "arena '", name_, "': cannot allocate ", capacity_, " bytes");
  }
}

Arena::~Arena() { std::free(base_); }

void* Arena::allocate(size_t bytes) {
  const size_t size = aligned(bytes);
  Q3VL_CHECK(size <= capacity_ - used_, "arena '", name_, "' exhausted: need ", size, " bytes, ",
             capacity_ - used_, " of ", capacity_, " free");
  void* p = static_cast<char*>(base_) + used_;
  used_ += size;
  if (used_ > high_water_) high_water_ = used_;
  return p;
}

void Arena::release(size_t mark) {
  Q3VL_CHECK(mark <= used_, "arena '", name_, "': release to ", mark, " beyond used ", used_);
  used_ = mark;
}

}  // namespace q3vl
