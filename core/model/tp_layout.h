// Tensor-parallel layout of the parameters: which dimension of each tensor the tp ranks split, the local
// shape a rank stores, and the map between a rank's local elements and the global (HF) tensor, used by the
// weight stores, checkpoint pieces and HF loading/export.
//
// Split rule (ParamSpec::tp_dim / tp_blocks): the global dimension of size G is cut into `blocks` equal blocks
// (q|k|v of the fused vision qkv, gate|up of the fused experts) and each block into `size` equal parts; rank
// t keeps part t of every block, in block order, so its local dimension is G / size. Experts are split only
// when tensor parallelism is not combined with expert parallelism (experts_split): with ep > 1 every tp rank
// holds its ep rank's experts whole (and computes them), so they count as replicated.
#pragma once

#include <cstdint>
#include <vector>

#include "core/model/config.h"
#include "core/model/param_specs.h"
#include "core/tensor.h"

namespace q3vl {

struct TpLayout {
  int size = 1, rank = 0;
  bool experts_split = true;  // false with expert parallelism: experts whole (replicated over tp)
};

// The split dimension of `spec` under `layout`, or -1 when every tp rank holds it whole (always -1 at size 1).
int tp_split_dim(const ParamSpec& spec, const TpLayout& layout);
// Replicated tensors whose per-rank gradients are partial sums (summed over the tp ranks before the update).
bool tp_partial_grad(const ParamSpec& spec, const TpLayout& layout);
Shape tp_local_shape(const ParamSpec& spec, const TpLayout& layout);

// Refuses a layout the model cannot be split by, naming the size that tp must divide.
void check_tp_layout(const ModelConfig& config, const TpLayout& layout);

// Local elements [local_offset, local_offset + numel) of `spec` on rank layout.rank as contiguous runs of the
// flattened global tensor, in local order.
struct TpRun {
  int64_t local_offset = 0, global_offset = 0, numel = 0;
};
std::vector<TpRun> tp_global_runs(const ParamSpec& spec, const TpLayout& layout, int64_t local_offset, int64_t numel);

}  // namespace q3vl
