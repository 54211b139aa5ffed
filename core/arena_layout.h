// One description of the tensors a layer takes from an arena, used both to size the arena and to carve it: a
// layer writes a function template over a `carve(shape, dtype)` callable that returns its tensors in order;
// ArenaSizer adds up their bytes (the size function), ArenaCarver takes them from an arena (the forward), so
// the two cannot drift. arena_bytes is the size of one such allocation, alignment included.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/arena.h"
#include "core/tensor.h"

namespace q3vl {

// Bytes one Tensor::empty of `elems` elements of `dtype` takes from an arena.
inline size_t arena_bytes(int64_t elems, DType dtype) {
  return Arena::aligned(static_cast<size_t>(elems) * dtype_size(dtype));
}

// Sizes a description: every carve adds the allocation's bytes and yields an undefined tensor.
class ArenaSizer {
 public:
  Tensor operator()(const Shape& shape, DType dtype) {
    bytes_ += arena_bytes(shape.numel(), dtype);
    return Tensor{};
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_ = 0;
};

// Carves a description from an arena, in the order it lists its tensors.
class ArenaCarver {
 public:
  explicit ArenaCarver(Arena& arena) : arena_(arena) {}
  Tensor operator()(const Shape& shape, DType dtype) { return Tensor::empty(arena_, shape, dtype); }

 private:
  Arena& arena_;
};

}  // namespace q3vl
