// Tensor-parallel parameter layout: split dimensions, local shapes, local-to-global element runs.
#include "core/model/tp_layout.h"

#include <algorithm>

#include "core/check.h"

namespace q3vl {

int tp_split_dim(const ParamSpec& s, const TpLayout& l) {
  if (l.size == 1) return -1;
  if (s.kind == ParamKind::experts && !l.experts_split) return -1;
  return s.tp_dim;
}

bool tp_partial_grad(const ParamSpec& s, const TpLayout& l) {
  if (l.size == 1 || !s.tp_partial_grad) return false;
  // The router's gradient is partial only when the experts' columns are split.
  return s.kind == ParamKind::norm || l.experts_split;
}

Shape tp_local_shape(const ParamSpec& s, const TpLayout& l) {
  Shape shape = s.shape;
  const int dim = tp_split_dim(s, l);
  if (dim >= 0) shape.dims[dim] /= l.size;
  return shape;
}

void check_tp_layout(const ModelConfig& c, const TpLayout& l) {
  Q3VL_CHECK(l.size >= 1 && l.rank >= 0 && l.rank < l.size, "tensor parallelism: rank ", l.rank, " of ", l.size);
  if (l.size == 1) return;
  const auto divides = [&](const char* what, int64_t n) {
    Q3VL_CHECK(n % l.size == 0, "parallel.tp ", l.size, " must divide ", what, " = ", n);
  };
  divides("num_attention_heads", c.text.num_attention_heads);
  divides("num_key_value_heads", c.text.num_key_value_heads);
  divides("vocab_size", c.text.vocab_size);
  if (c.num_moe_layers() < c.text.num_hidden_layers) divides("intermediate_size", c.text.intermediate_size);
  if (c.num_moe_layers() > 0 && l.experts_split) divides("moe_intermediate_size", c.text.moe_intermediate_size);
  divides("vision num_heads", c.vision.num_heads);
  divides("vision intermediate_size", c.vision.intermediate_size);
  divides("vision merged hidden size", c.vision.merged_hidden_size());
}

std::vector<TpRun> tp_global_runs(const ParamSpec& s, const TpLayout& l, int64_t local_offset, int64_t numel) {
  std::vector<TpRun> runs;
  const int dim = tp_split_dim(s, l);
  if (dim < 0) {
    if (numel > 0) runs.push_back({local_offset, local_offset, numel});
    return runs;
  }
  // Elements are [outer][dim][inner]; a local index along dim maps to (block, part-local) and back to global.
  int64_t inner = 1;
  for (int d = dim + 1; d < s.shape.ndim; ++d) inner *= s.shape[d];
  const int64_t global_dim = s.shape[dim], local_dim = global_dim / l.size;
  const int64_t part = local_dim / s.tp_blocks, block = global_dim / s.tp_blocks;
  // A run: `part` consecutive indices along dim (one block's part) times inner elements.
  const int64_t run = part * inner;
  int64_t at = local_offset;
  const int64_t end = local_offset + numel;
  while (at < end) {
    const int64_t o = at / (local_dim * inner), rest = at % (local_dim * inner);
    const int64_t b = rest / run, within = rest % run;
    const int64_t global = (o * global_dim + b * block + l.rank * part) * inner + within;
    const int64_t n = std::min(end - at, run - within);
    runs.push_back({at, global, n});
    at += n;
  }
  return runs;
}

}  // namespace q3vl
