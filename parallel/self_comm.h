// SelfComm: the one-rank Comm, without MPI, for single-process runs and tests. Every collective is the
// identity (gathers and all-to-alls copy); the argument checks are the same as for a real backend.
#pragma once

#include "parallel/comm.h"

namespace q3vl::parallel {

class SelfComm final : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void barrier() override {}

 protected:
  void do_broadcast(void* data, size_t bytes, int root) override;
  void do_all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override;
  void do_all_gather(const std::byte* send, std::byte* recv, size_t bytes_per_rank) override;
  void do_reduce_scatter_sum(const void* send, void* recv, size_t block, DType dtype) override;
  void do_all_to_all_v(const std::byte* send, const int64_t* send_counts, const int64_t* send_displs,
                       std::byte* recv, const int64_t* recv_counts, const int64_t* recv_displs) override;
  std::vector<std::string> do_gather_strings(const std::string& mine, int root) override;
  std::unique_ptr<Comm> do_split(int color, int key) override;
};

}  // namespace q3vl::parallel
