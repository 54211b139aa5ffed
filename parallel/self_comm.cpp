// SelfComm: collectives over one rank are copies (or nothing).
#include "parallel/self_comm.h"

#include <cstring>

#include "core/check.h"

namespace q3vl::parallel {

void SelfComm::do_broadcast(void*, size_t, int) {}

void SelfComm::do_all_reduce(void*, size_t, DType, ReduceOp) {}

void SelfComm::do_all_gather(const std::byte* send, std::byte* recv, size_t bytes_per_rank) {
  if (bytes_per_rank > 0) std::memmove(recv, send, bytes_per_rank);
}

void SelfComm::do_reduce_scatter_sum(const void* send, void* recv, size_t block, DType dtype) {
  if (block > 0) std::memmove(recv, send, block * dtype_size(dtype));
}

void SelfComm::do_all_to_all_v(const std::byte* send, const int64_t* send_counts, const int64_t* send_displs,
                               std::byte* recv, const int64_t* recv_counts, const int64_t* recv_displs) {
  Q3VL_CHECK(send_counts[0] == recv_counts[0], "parallel: all_to_all_v: rank 0 sends ", send_counts[0],
             " bytes to itself but expects to receive ", recv_counts[0]);
  if (send_counts[0] > 0) std::memmove(recv + recv_displs[0], send + send_displs[0], send_counts[0]);
}

std::vector<std::string> SelfComm::do_gather_strings(const std::string& mine, int) { return {mine}; }

std::unique_ptr<Comm> SelfComm::do_split(int, int) { return std::make_unique<SelfComm>(); }

}  // namespace q3vl::parallel
