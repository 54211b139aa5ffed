// CommExpertExchange: the MoE layer's ExpertExchange (core/layers/moe.h) over a Comm, so that moe_forward /
// moe_backward dispatch rows to the ranks of an expert-parallel group (a Comm of its own, e.g. from split()).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/layers/moe.h"
#include "parallel/comm.h"

namespace q3vl::parallel {

class CommExpertExchange final : public ExpertExchange {
 public:
  // comm must outlive this object; its ranks are the expert-parallel group (rank q owns expert block q).
  explicit CommExpertExchange(Comm& comm);

  int size() const override { return comm_.size(); }
  int rank() const override { return comm_.rank(); }
  void exchange_counts(std::span<const int64_t> send, std::span<int64_t> recv) override;
  void exchange_rows(const void* send, std::span<const int64_t> send_rows, void* recv,
                     std::span<const int64_t> recv_rows, size_t row_bytes) override;

 private:
  // Fills counts / displs (bytes, one per rank) for blocks of rows[q] * row_bytes bytes back to back and
  // returns their total.
  static size_t lay_out(const char* side, std::span<const int64_t> rows, size_t row_bytes,
                        std::span<int64_t> counts, std::span<int64_t> displs);

  Comm& comm_;
  // Byte counts and displacements of the current all-to-all, one per rank, sized once by the constructor so
  // that an exchange allocates nothing.
  std::vector<int64_t> send_counts_, send_displs_, recv_counts_, recv_displs_;
};

}  // namespace q3vl::parallel
