// ProcessGrid: the ranks of a run arranged as dp x fsdp x ep x tp, and the communicators each parallelism
// needs, split from the world communicator.
//
// Rank r = ((d * fsdp + f) * ep + e) * tp + t: tensor-parallel ranks are neighbours, then expert-parallel
// ones (both exchange activations every layer, so they sit close together), then FSDP, then the replicas.
// Every rank of a replica (fixed d) reads its own sequences except that tp ranks share theirs. Inside a
// replica the non-expert parameters are sharded over the fsdp x ep ranks of one tp index (the ep ranks are
// data-parallel for them, as torchtitan's dp_shard = fsdp x ep), the experts are split over the ep ranks and a
// rank's experts are sharded over the fsdp ranks that hold the same experts.
#pragma once

#include <memory>
#include <string>

#include "parallel/comm.h"

namespace q3vl::parallel {

struct GridShape {
  int dp = 1, fsdp = 1, ep = 1, tp = 1;
  int world() const { return dp * fsdp * ep * tp; }
  // Pure data parallelism: every rank holds the whole model (resident sharding, sharded_params.h).
  bool data_parallel_only() const { return fsdp * ep * tp == 1; }
  std::string str() const;  // "dp 1 x fsdp 2 x ep 2 x tp 1"
};

class ProcessGrid {
 public:
  // Splits `world` (collective: every rank calls it with the same shape). The product must equal the world
  // size (error naming both).
  ProcessGrid(Comm& world, const GridShape& shape);

  const GridShape& shape() const { return shape_; }
  int dp_index() const { return d_; }
  int fsdp_index() const { return f_; }
  int ep_index() const { return e_; }
  int tp_index() const { return t_; }

  Comm& world() { return world_; }
  Comm& replica() { return *replica_; }        // the fsdp x ep x tp ranks of this replica
  Comm& shard() { return *shard_; }            // fsdp x ep ranks sharing non-expert parameters (same tp index)
  Comm& expert() { return *expert_; }          // ep ranks exchanging tokens for their experts
  Comm& expert_shard() { return *expert_shard_; }  // fsdp ranks sharing the same experts
  Comm& replicate() { return *replicate_; }    // dp ranks holding the same shards
  Comm& tp() { return *tp_; }                  // tp ranks splitting the same layers (same tokens)
  Comm& data() { return *data_; }              // dp x fsdp x ep ranks of one tp index: distinct token streams

 private:
  Comm& world_;
  GridShape shape_;
  int d_ = 0, f_ = 0, e_ = 0, t_ = 0;
  std::unique_ptr<Comm> replica_, shard_, expert_, expert_shard_, replicate_, tp_, data_;
};

}  // namespace q3vl::parallel
