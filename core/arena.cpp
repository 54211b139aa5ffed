// Arena implementation: host memory, or one device allocation (core/device.h) for a CUDA arena.
#include "core/arena.h"

#include <sys/mman.h>

#include <cstdlib>

#include "core/check.h"
#include "core/device.h"

namespace q3vl {

Arena::Arena(std::string name, size_t capacity_bytes, Device device)
    : name_(std::move(name)), device_(device), capacity_(aligned(capacity_bytes)) {
  if (device_ == Device::cuda) {
    // Device memory is never touched by the host, so it is one allocation even when empty-sized arenas
    // are asked for (a null base is fine there).
    if (capacity_ > 0) base_ = device_alloc(capacity_, "arena '" + name_ + "'");
    return;
  }
  if (capacity_ >= kReserveFrom) {
    // Reserved, not committed: pages take memory once written, so an arena sized for a worst case that is
    // rarely reached (the expert-parallel rows) costs address space, not memory.
    base_ = mmap(nullptr, capacity_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    Q3VL_CHECK(base_ != MAP_FAILED, "arena '", name_, "': cannot reserve ", capacity_, " bytes");
    mapped_ = true;
  } else if (capacity_ > 0) {
    base_ = std::aligned_alloc(kAlign, capacity_);
    Q3VL_CHECK(base_ != nullptr, "arena '", name_, "': cannot allocate ", capacity_, " bytes");
  }
}

Arena::~Arena() {
  if (device_ == Device::cuda)
    device_free(base_);
  else if (mapped_)
    munmap(base_, capacity_);
  else
    std::free(base_);
}

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
