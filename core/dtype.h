// Element types and devices a Tensor can describe. fp32 is the compute type of the CPU backend, fp64 is
// used by the finite-difference tests; bf16/fp16 are storage types (checkpoints, later the CUDA backend).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace q3vl {

enum class DType : uint8_t { f32, f64, bf16, f16, i32, i64, u8 };
enum class Device : uint8_t { cpu, cuda };

size_t dtype_size(DType dt);
std::string_view dtype_name(DType dt);
std::string_view device_name(Device d);

template <class T>
constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::i64; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::u8; }

}  // namespace q3vl
