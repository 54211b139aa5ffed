// Rotary position embeddings as Hugging Face computes them for Qwen3-VL: cos/sin tables [N, head_dim] from
// integer positions (plain 1-D, the text tower's interleaved MRoPE, the vision tower's 2-D row/column
// rotary), and the rotate_half rotation of [N, H, D] queries/keys with its transpose for the backward.
//
// Angles follow HF exactly: inv_freq[i] = 1 / theta^(2i/dim) and position * inv_freq are both computed in
// fp32 (at large positions these fp32 angles differ visibly from exact ones, and parity needs the fp32
// ones); cos/sin are then evaluated in the output dtype. Table layout is cat(freqs, freqs): column j and
// column j + head_dim/2 share an angle.
#pragma once

#include <array>
#include <cstdint>

#include "core/tensor.h"

namespace q3vl {

// The vision tower's rotary base (HF Qwen3VLVisionRotaryEmbedding default).
constexpr double kVisionRopeTheta = 1e4;

// positions i64 [N]; cos, sin [N, head_dim] f32 or f64 (written). head_dim even.
void rope_cos_sin(const Tensor& positions, int64_t head_dim, double theta, const Tensor& cos, const Tensor& sin);

// Interleaved MRoPE (HF apply_interleaved_mrope). positions i64 [3, N], rows (T, H, W). Frequency j of the
// head_dim/2 uses row H when j % 3 == 1 and j < 3 * sections[1], row W when j % 3 == 2 and
// j < 3 * sections[2], row T otherwise (Qwen3-VL's {24, 20, 20}: T 24, H 20, W 20 frequencies).
// sections must be non-negative and sum to head_dim/2.
void mrope_cos_sin(const Tensor& positions, int64_t head_dim, double theta, const std::array<int64_t, 3>& sections,
                   const Tensor& cos, const Tensor& sin);

// Vision 2-D rotary: rows, cols i64 [N] (patch coordinates); head_dim divisible by 4. The rotary dim is
// head_dim/2 with head_dim/4 inverse frequencies f; per patch the angles are [row*f | col*f] (head_dim/2),
// doubled by cat to head_dim. Qwen3-VL: head_dim 72, 18 frequencies, theta kVisionRopeTheta.
void vision_rope_cos_sin(const Tensor& rows, const Tensor& cols, int64_t head_dim, double theta, const Tensor& cos,
                         const Tensor& sin);

// y = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1). x, y [N, H, D]; cos, sin [N, D]
// of x's dtype, broadcast over heads. y may alias x.
void rotary_forward(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& y);
// dx = the transposed rotation of dy (written). dx may alias dy.
void rotary_backward(const Tensor& dy, const Tensor& cos, const Tensor& sin, const Tensor& dx);

}  // namespace q3vl
