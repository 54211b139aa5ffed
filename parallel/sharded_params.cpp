// ShardedParams: flat-group sharding of the model's units, gathers into and reduce-scatters out of the model's
// lazily committed parameter stores.
#include "parallel/sharded_params.h"

#include <algorithm>
#include <cstring>

#include "core/check.h"

namespace q3vl::parallel {

namespace {

constexpr const char* kWhere = "ShardedParams";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

ShardedParams::ShardedParams(Model& model, ProcessGrid& grid, Residency residency)
    : model_(model), residency_(residency) {
  const ModelConfig& c = model.config();
  Q3VL_CHECK(model.dtype() == DType::f32, kWhere, ": the model must be f32, not ", dtype_name(model.dtype()));
  const GridShape& shape = grid.shape();
  const bool keep = resident();
  Q3VL_CHECK(!keep || shape.data_parallel_only(), kWhere,
             ": resident parameters are for pure data parallelism (fsdp = ep = tp = 1), not fsdp ", shape.fsdp,
             ", ep ", shape.ep, ", tp ", shape.tp);
  // Resident: the dp ranks split the optimizer's elements and sum the gradients themselves; per unit: the
  // replica's ranks split everything, the dp replicas sum their shards' gradients.
  replicas_ = keep ? nullptr : &grid.replicate();
  owners_ = keep ? &grid.replicate() : &grid.replica();
  const int ep = shape.ep;
  if (ep > 1) {
    Q3VL_CHECK(c.num_moe_layers() > 0, kWhere, ": parallel.ep ", ep, " needs an MoE model");
    Q3VL_CHECK(c.text.num_experts % ep == 0, kWhere, ": parallel.ep ", ep, " must divide num_experts ",
               c.text.num_experts);
  }
  const ParamStore& w = model.weights();
  ParamStore& g = model.grads();
  const std::vector<ParamSpec>& specs = w.specs();
  size_t shard_size = 0, staging = 0, recv = 0;
  for (const ParamUnit& pu : model.units()) {
    Unit unit;
    Group dense, experts;
    dense.comm = keep ? &grid.replicate() : &grid.shard();
    experts.comm = keep ? &grid.replicate() : &grid.expert_shard();
    for (size_t i = pu.first_spec; i < pu.end_spec; ++i) {
      Part p;
      p.spec = i;
      p.numel = w.tensor(i).numel();  // this rank's tensor-parallel slice
      const bool local_experts = specs[i].kind == ParamKind::experts && ep > 1;
      if (local_experts) {
        const int64_t per_expert = p.numel / c.text.num_experts, local = c.text.num_experts / ep;
        p.offset = grid.ep_index() * local * per_expert;
        p.numel = local * per_expert;
      }
      p.weight = w.tensor(i).data<float>() + p.offset;
      p.grad = g.tensor(i).data<float>() + p.offset;
      unit.local_bytes += 4 * p.numel;
      (local_experts ? experts : dense).parts.push_back(p);
    }
    for (Group* grp : {&dense, &experts}) {
      if (grp->parts.empty()) continue;
      for (const Part& p : grp->parts) grp->total += p.numel;
      const int64_t ranks = grp->comm->size();
      grp->chunk = ceil_div(grp->total, ranks);
      grp->lo = std::min(grp->total, grp->comm->rank() * grp->chunk);
      grp->hi = std::min(grp->total, grp->lo + grp->chunk);
      grp->shard_at = shard_size;
      if (!keep) shard_size += static_cast<size_t>(grp->chunk);
      if (!keep || ranks > 1) {
        staging = std::max(staging, static_cast<size_t>(grp->chunk * ranks));
        recv = std::max(recv, static_cast<size_t>(grp->chunk));
      }
      unit.groups.push_back(*grp);
    }
    memory_.largest_unit = std::max(memory_.largest_unit, unit.local_bytes);
    units_.push_back(std::move(unit));
  }
  weight_shard_.assign(shard_size, 0.0f);
  grad_shard_.assign(shard_size, 0.0f);
  staging_.assign(staging, 0.0f);
  received_.assign(recv, 0.0f);
  memory_.weight_shard = memory_.grad_shard =
      keep ? static_cast<int64_t>(ParamStore::bytes(c, DType::f32)) : static_cast<int64_t>(4 * shard_size);
  memory_.staging = static_cast<int64_t>(4 * (staging + recv));

  // This rank's pieces: each group's [lo, hi) cut at the part boundaries. Resident pieces are the elements
  // themselves in the model's stores.
  for (Unit& u : units_) {
    for (Group& grp : u.groups) {
      grp.first_piece = pieces_.size();
      int64_t at = 0;
      for (const Part& p : grp.parts) {
        const int64_t b = std::max(grp.lo, at), e = std::min(grp.hi, at + p.numel);
        if (e > b) {
          const size_t s = grp.shard_at + static_cast<size_t>(b - grp.lo);
          float* weight = keep ? p.weight + (b - at) : weight_shard_.data() + s;
          float* grad = keep ? p.grad + (b - at) : grad_shard_.data() + s;
          pieces_.push_back({p.spec, p.offset + (b - at), e - b, weight, grad});
          piece_at_.push_back(b - grp.lo);
        }
        at += p.numel;
      }
      grp.end_piece = pieces_.size();
    }
  }
  for (const Piece& p : pieces_) piece_params_.push_back(p.param);
}

void ShardedParams::require_per_unit(const char* what) const {
  Q3VL_CHECK(!resident(), kWhere, ": ", what, " is for per-unit (FSDP) sharding; resident parameters stay gathered");
}

void ShardedParams::init(uint64_t seed, double std) {
  require_per_unit("init");
  ParamStore& w = model_.weights();
  for (size_t u = 0; u < units_.size(); ++u) {
    const ParamUnit& pu = model_.units()[u];
    w.init(seed, std, pu.first_spec, pu.end_spec);
    for (const Group& grp : units_[u].groups) {
      int64_t at = 0;
      for (const Part& p : grp.parts) {
        const int64_t b = std::max(grp.lo, at), e = std::min(grp.hi, at + p.numel);
        if (e > b) std::memcpy(weight_shard_.data() + grp.shard_at + (b - grp.lo), p.weight + (b - at), 4 * (e - b));
        at += p.numel;
      }
    }
    w.discard_unit(u);
  }
}

void ShardedParams::zero_grads() {
  if (resident()) model_.zero_grads();
  else std::fill(grad_shard_.begin(), grad_shard_.end(), 0.0f);
}

void ShardedParams::reduce_gradients() {
  if (!resident()) {
    if (replicas_->size() > 1) replicas_->all_reduce_sum(std::span<float>(grad_shard_));
    return;
  }
  for (const Unit& u : units_) {
    for (const Group& grp : u.groups) {
      if (grp.comm->size() == 1) continue;  // the pieces are the whole gradients
      const float* mine = reduce_scatter_group(grp);
      for (size_t k = grp.first_piece; k < grp.end_piece; ++k)
        std::memcpy(pieces_[k].grad, mine + piece_at_[k], 4 * static_cast<size_t>(pieces_[k].numel));
    }
  }
}

const float* ShardedParams::reduce_scatter_group(const Group& grp) {
  // Padded to ranks x chunk; this rank receives the sum of its chunk, which is all its optimizer reads.
  const size_t chunk = static_cast<size_t>(grp.chunk), ranks = static_cast<size_t>(grp.comm->size());
  float* send = staging_.data();
  int64_t at = 0;
  for (const Part& p : grp.parts) {
    std::memcpy(send + at, p.grad, 4 * static_cast<size_t>(p.numel));
    at += p.numel;
  }
  std::fill(send + grp.total, send + chunk * ranks, 0.0f);
  if (ranks == 1) return send;
  grp.comm->reduce_scatter_sum(std::span<const float>(send, chunk * ranks), std::span<float>(received_.data(), chunk));
  return received_.data();
}

void ShardedParams::parameters_updated() {
  // One rank: the pieces are the weights themselves.
  if (!resident() || owners_->size() == 1) return;
  const ParamStore& w = model_.weights();
  gather_whole(piece_params_, [&](size_t spec) { return w.tensor(spec).data<float>(); });
}

void ShardedParams::gather_whole(const std::vector<const float*>& values,
                                 const std::function<float*(size_t spec)>& whole) {
  Q3VL_CHECK(values.size() == pieces_.size(), kWhere, ": gather_whole takes ", pieces_.size(), " piece values, got ",
             values.size());
  for (const Unit& u : units_) {
    for (const Group& grp : u.groups) {
      if (grp.comm->size() == 1) {
        // One rank's pieces are its parts, whole: copy unless they already are the destination.
        for (size_t k = grp.first_piece; k < grp.end_piece; ++k) {
          float* to = whole(pieces_[k].spec) + pieces_[k].offset;
          if (to != values[k]) std::memcpy(to, values[k], 4 * static_cast<size_t>(pieces_[k].numel));
        }
        continue;
      }
      float* mine = received_.data();
      std::fill_n(mine, grp.chunk, 0.0f);
      for (size_t k = grp.first_piece; k < grp.end_piece; ++k)
        std::memcpy(mine + piece_at_[k], values[k], 4 * static_cast<size_t>(pieces_[k].numel));
      gather_group(grp, mine, whole);
    }
  }
}

void ShardedParams::add_gathered(int64_t bytes) {
  memory_.gathered += bytes;
  memory_.gathered_peak = std::max(memory_.gathered_peak, memory_.gathered);
}

void ShardedParams::gather_group(const Group& grp, const float* mine, const std::function<float*(size_t spec)>& whole) {
  const size_t chunk = static_cast<size_t>(grp.chunk), ranks = static_cast<size_t>(grp.comm->size());
  const float* full = mine;
  if (ranks > 1) {
    // The chunk beyond hi is padding: its content never reaches a part.
    grp.comm->all_gather(std::span<const float>(mine, chunk), std::span<float>(staging_.data(), chunk * ranks));
    full = staging_.data();
  }
  int64_t at = 0;
  for (const Part& p : grp.parts) {
    std::memcpy(whole(p.spec) + p.offset, full + at, 4 * static_cast<size_t>(p.numel));
    at += p.numel;
  }
}

void ShardedParams::acquire(int unit) {
  require_per_unit("acquire");
  Unit& u = units_.at(static_cast<size_t>(unit));
  Q3VL_CHECK(!u.held, kWhere, ": unit '", model_.units()[unit].name, "' acquired twice");
  const ParamStore& w = model_.weights();
  for (const Group& grp : u.groups)
    gather_group(grp, weight_shard_.data() + grp.shard_at, [&](size_t spec) { return w.tensor(spec).data<float>(); });
  u.held = true;
  add_gathered(u.local_bytes);
}

void ShardedParams::release(int unit) {
  require_per_unit("release");
  Unit& u = units_.at(static_cast<size_t>(unit));
  Q3VL_CHECK(u.held, kWhere, ": unit '", model_.units()[unit].name, "' released but not held");
  model_.weights().discard_unit(static_cast<size_t>(unit));
  u.held = false;
  memory_.gathered -= u.local_bytes;
}

void ShardedParams::gradients_ready(int unit) {
  require_per_unit("gradients_ready");
  Unit& u = units_.at(static_cast<size_t>(unit));
  // The unit's gradients were written by its backward: count them until they are handed back.
  add_gathered(u.local_bytes);
  for (const Group& grp : u.groups) {
    const size_t chunk = static_cast<size_t>(grp.chunk);
    const float* mine = reduce_scatter_group(grp);
    float* shard = grad_shard_.data() + grp.shard_at;
    for (size_t k = 0; k < chunk; ++k) shard[k] += mine[k];
  }
  model_.grads().discard_unit(static_cast<size_t>(unit));
  memory_.gathered -= u.local_bytes;
}

void ShardedParams::for_each_gathered_unit(const std::function<void(int)>& visit) {
  for (size_t u = 0; u < units_.size(); ++u) {
    if (resident()) {
      visit(static_cast<int>(u));
      continue;
    }
    acquire(static_cast<int>(u));
    visit(static_cast<int>(u));
    release(static_cast<int>(u));
  }
}

}  // namespace q3vl::parallel
