// ShardedParams: the one parameter-sharding mechanism of the trainer, for every layout. Two residencies:
// - per_unit (FSDP, ZeRO-3; layouts with fsdp x ep x tp > 1): parameters, gradients and AdamW state are sharded;
//   the model's ParamUnitHooks gather a unit for its forward and backward and reduce-scatter its gradients.
// - resident (pure data parallelism, ZeRO-1; fsdp = ep = tp = 1, one process included): every rank keeps the
//   whole weights and gradients in the model's stores; the same flat groups, sharded over the dp ranks, say
//   which elements each rank's AdamW steps. reduce_gradients() reduce-scatters the whole gradients into those
//   elements and parameters_updated() all-gathers the updated ones. On one rank both are no-ops and the pieces
//   are the model's tensors.
//
// Each FSDP unit (core/model/param_units.h) is cut into at most two flat groups: its non-expert tensors,
// sharded over grid.shard() (fsdp x ep ranks), and this rank's experts (E/ep rows of each expert tensor; all
// of them when ep = 1, where they join the first group), sharded over grid.expert_shard() (fsdp ranks). A
// group of U elements over g ranks gives rank i the elements [i * c, min(U, (i + 1) * c)), c = ceil(U / g),
// of the concatenation of its tensors (parts) in parameter order. Per unit, the shards, their gradients and the
// optimizer state are all this rank keeps; the model's full-size weight and gradient stores hold only the
// units in use:
//   acquire(u)          all-gathers u's groups into the weight store;
//   release(u)          returns u's weight pages to the system;
//   gradients_ready(u)  reduce-scatters u's gradients from the gradient store and adds this rank's part to
//                       the gradient shard, then returns u's gradient pages (they read as zero again).
// Gradient shards therefore accumulate over micro-batches; zero_grads() clears them at a step's start.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/model/model.h"
#include "core/model/param_units.h"
#include "parallel/process_grid.h"

namespace q3vl::parallel {

enum class Residency { per_unit, resident };

class ShardedParams final : public ParamUnitHooks {
 public:
  // Elements [offset, offset + numel) of flattened parameter `spec` (its index in model_param_specs; under
  // tensor parallelism, of this rank's local slice: core/model/tp_layout.h maps them to the global tensor)
  // that this rank owns, with their place in the shards (resident: in the model's stores).
  struct Piece {
    size_t spec = 0;
    int64_t offset = 0, numel = 0;
    float* param = nullptr;
    float* grad = nullptr;
  };
  struct Memory {
    int64_t weight_shard = 0, grad_shard = 0;  // bytes of this rank's shards (padded chunks)
    int64_t staging = 0;                       // collective buffers
    int64_t gathered = 0, gathered_peak = 0;   // weight + gradient bytes of units materialised now / at most
    int64_t largest_unit = 0;                  // bytes of the largest unit's local weights
  };

  // The model must be f32 and hold the grid's layout (ep must divide num_experts). Resident: the layout must
  // be pure data parallelism and the model's weights already loaded (every rank the same).
  ShardedParams(Model& model, ProcessGrid& grid, Residency residency = Residency::per_unit);
  ShardedParams(const ShardedParams&) = delete;
  ShardedParams& operator=(const ShardedParams&) = delete;

  const std::vector<Piece>& pieces() const { return pieces_; }
  // The model's deterministic initialisation (ParamStore::init), materialising one unit at a time.
  void init(uint64_t seed, double std);
  bool resident() const { return residency_ == Residency::resident; }
  void zero_grads();
  // After the backward of a step's micro-batches: every piece's gradient becomes the sum over all data ranks.
  // Per unit: the shards (already reduce-scattered in the replica) are all-reduced over the dp replicas;
  // resident: the whole gradients are reduce-scattered over the dp ranks into this rank's pieces.
  void reduce_gradients();
  // After the optimizer stepped the pieces. Resident: all-gathers them into every rank's whole weights; per
  // unit: nothing (the next acquire gathers).
  void parameters_updated();
  // The ranks whose pieces together hold every (tp-local) element once: a sum over the model's elements (the
  // gradient norm) is the sum over these ranks of their pieces' sums.
  Comm& piece_owners() { return *owners_; }
  // Whole (tp-local) tensors from the ranks' pieces (all ranks): `values[k]` holds piece k's elements (of a
  // per-piece quantity such as an AdamW moment) and `whole(spec)` is where spec's whole tensor goes.
  void gather_whole(const std::vector<const float*>& values, const std::function<float*(size_t spec)>& whole);
  Memory memory() const { return memory_; }

  // Materialises every unit in turn (all ranks, same order): `visit(u)` runs while unit u's weights are in
  // the model's weight store (export).
  void for_each_gathered_unit(const std::function<void(int unit)>& visit);

  void acquire(int unit) override;
  void release(int unit) override;
  void gradients_ready(int unit) override;

 private:
  struct Part {
    size_t spec = 0;
    int64_t offset = 0, numel = 0;  // elements of the flattened parameter
    float* weight = nullptr;        // their place in the model's weight and gradient stores
    float* grad = nullptr;
  };
  struct Group {
    std::vector<Part> parts;
    Comm* comm = nullptr;
    int64_t total = 0, chunk = 0, lo = 0, hi = 0;  // this rank's elements [lo, hi) of the group
    size_t shard_at = 0;                           // its chunk's place in the shard buffers (per unit)
    size_t first_piece = 0, end_piece = 0;         // this rank's pieces of the group
  };
  struct Unit {
    std::vector<Group> groups;
    int64_t local_bytes = 0;  // weight bytes of this rank's parts (the store bytes a gather fills)
    bool held = false;
  };
  // All-gathers the group's chunks (this rank's: `mine`) and writes each part to whole(spec) + its offset.
  void gather_group(const Group& g, const float* mine, const std::function<float*(size_t spec)>& whole);
  // Sums the group's gradients (the parts in the model's gradient store) over its ranks: this rank's chunk.
  const float* reduce_scatter_group(const Group& g);
  void add_gathered(int64_t bytes);
  void require_per_unit(const char* what) const;

  Model& model_;
  Residency residency_;
  Comm* replicas_ = nullptr;  // per unit: the dp ranks holding the same shards
  Comm* owners_ = nullptr;
  std::vector<Unit> units_;
  std::vector<float> weight_shard_, grad_shard_, staging_, received_;
  std::vector<Piece> pieces_;
  std::vector<int64_t> piece_at_;  // each piece's first element within its group's chunk
  std::vector<const float*> piece_params_;  // pieces_[k].param, as gather_whole takes them
  Memory memory_;
};

}  // namespace q3vl::parallel
