// ProcessGrid: rank coordinates and communicator splits of the dp x fsdp x ep x tp grid.
#include "parallel/process_grid.h"

#include "core/check.h"

namespace q3vl::parallel {

std::string GridShape::str() const {
  return "dp " + std::to_string(dp) + " x fsdp " + std::to_string(fsdp) + " x ep " + std::to_string(ep) + " x tp " +
         std::to_string(tp);
}

ProcessGrid::ProcessGrid(Comm& world, const GridShape& shape) : world_(world), shape_(shape) {
  Q3VL_CHECK(shape.dp >= 1 && shape.fsdp >= 1 && shape.ep >= 1 && shape.tp >= 1, "parallel: every degree must be >= 1 (",
             shape.str(), ")");
  Q3VL_CHECK(shape.world() == world.size(), "parallel: ", shape.str(), " = ", shape.world(), " ranks, but the job has ",
             world.size(), " (mpirun -n / srun --ntasks)");
  const int r = world.rank();
  t_ = r % shape.tp;
  e_ = (r / shape.tp) % shape.ep;
  f_ = (r / (shape.tp * shape.ep)) % shape.fsdp;
  d_ = r / (shape.tp * shape.ep * shape.fsdp);
  // Colors enumerate the other coordinates; keys keep world order inside each communicator.
  replica_ = world.split(d_, r);
  shard_ = world.split(d_ * shape.tp + t_, r);
  expert_ = world.split((d_ * shape.fsdp + f_) * shape.tp + t_, r);
  expert_shard_ = world.split((d_ * shape.ep + e_) * shape.tp + t_, r);
  replicate_ = world.split((f_ * shape.ep + e_) * shape.tp + t_, r);
  tp_ = world.split((d_ * shape.fsdp + f_) * shape.ep + e_, r);
  data_ = world.split(t_, r);
}

}  // namespace q3vl::parallel
