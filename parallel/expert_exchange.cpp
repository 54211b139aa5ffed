// CommExpertExchange: counts and rows of the MoE expert dispatch as byte all-to-alls over the Comm.
#include "parallel/expert_exchange.h"

#include "core/check.h"

namespace q3vl::parallel {

CommExpertExchange::CommExpertExchange(Comm& comm)
    : comm_(comm),
      send_counts_(static_cast<size_t>(comm.size())),
      send_displs_(static_cast<size_t>(comm.size())),
      recv_counts_(static_cast<size_t>(comm.size())),
      recv_displs_(static_cast<size_t>(comm.size())) {}

size_t CommExpertExchange::lay_out(const char* side, std::span<const int64_t> rows, size_t row_bytes,
                                   std::span<int64_t> counts, std::span<int64_t> displs) {
  int64_t total = 0;
  for (size_t q = 0; q < rows.size(); ++q) {
    Q3VL_CHECK(rows[q] >= 0, "parallel: expert exchange_rows: ", side, " rows for rank ", q, " are negative (",
               rows[q], ")");
    counts[q] = rows[q] * static_cast<int64_t>(row_bytes);
    displs[q] = total;
    total += counts[q];
  }
  return static_cast<size_t>(total);
}

void CommExpertExchange::exchange_counts(std::span<const int64_t> send, std::span<int64_t> recv) {
  const size_t P = static_cast<size_t>(comm_.size());
  Q3VL_CHECK(send.size() % P == 0 && recv.size() == send.size(), "parallel: expert exchange_counts: send holds ",
             send.size(), " and recv ", recv.size(), " counts; both need the same multiple of the group size ", P);
  const int64_t block = static_cast<int64_t>((send.size() / P) * sizeof(int64_t));
  for (size_t q = 0; q < P; ++q) {
    send_counts_[q] = block;
    send_displs_[q] = static_cast<int64_t>(q) * block;
  }
  comm_.all_to_all_v(std::as_bytes(send), send_counts_, send_displs_, std::as_writable_bytes(recv), send_counts_,
                     send_displs_);
}

void CommExpertExchange::exchange_rows(const void* send, std::span<const int64_t> send_rows, void* recv,
                                       std::span<const int64_t> recv_rows, size_t row_bytes) {
  const size_t P = static_cast<size_t>(comm_.size());
  Q3VL_CHECK(send_rows.size() == P && recv_rows.size() == P, "parallel: expert exchange_rows: ", send_rows.size(),
             " send and ", recv_rows.size(), " receive row counts, expected one per rank (", P, ")");
  const size_t send_bytes = lay_out("send", send_rows, row_bytes, send_counts_, send_displs_);
  const size_t recv_bytes = lay_out("receive", recv_rows, row_bytes, recv_counts_, recv_displs_);
  comm_.all_to_all_v({static_cast<const std::byte*>(send), send_bytes}, send_counts_, send_displs_,
                     {static_cast<std::byte*>(recv), recv_bytes}, recv_counts_, recv_displs_);
}

}  // namespace q3vl::parallel
