// Comm's argument checks (shared by every backend) and the count-exchanging all-to-all helpers.
#include "parallel/comm.h"

#include "core/check.h"

namespace q3vl::parallel {

namespace {

// Counts and displacements of an all-to-all: one per rank, non-negative, each block inside its buffer.
void check_blocks(const char* side, std::span<const int64_t> counts, std::span<const int64_t> displs,
                  size_t buffer_bytes, int size) {
  Q3VL_CHECK(counts.size() == static_cast<size_t>(size) && displs.size() == static_cast<size_t>(size),
             "parallel: all_to_all_v: ", side, " has ", counts.size(), " counts and ", displs.size(),
             " displacements, expected one per rank (", size, ")");
  for (int r = 0; r < size; ++r) {
    Q3VL_CHECK(counts[r] >= 0 && displs[r] >= 0, "parallel: all_to_all_v: ", side, " block for rank ", r,
               " has count ", counts[r], " and displacement ", displs[r], "; both must be non-negative");
    Q3VL_CHECK(static_cast<uint64_t>(displs[r]) + static_cast<uint64_t>(counts[r]) <= buffer_bytes,
               "parallel: all_to_all_v: ", side, " block for rank ", r, " spans bytes [", displs[r], ", ",
               displs[r] + counts[r], ") of a ", buffer_bytes, "-byte buffer");
  }
}

}  // namespace

void Comm::check_root(const char* operation, int root) const {
  Q3VL_CHECK(root >= 0 && root < size(), "parallel: ", operation, ": root ", root, " is outside ranks 0..",
             size() - 1);
}

void Comm::broadcast(void* data, size_t bytes, int root) {
  check_root("broadcast", root);
  Q3VL_CHECK(data != nullptr || bytes == 0, "parallel: broadcast: null buffer for ", bytes, " bytes");
  do_broadcast(data, bytes, root);
}

void Comm::all_reduce_sum(std::span<float> data) { do_all_reduce(data.data(), data.size(), DType::f32, ReduceOp::sum); }
void Comm::all_reduce_sum(std::span<double> data) { do_all_reduce(data.data(), data.size(), DType::f64, ReduceOp::sum); }
void Comm::all_reduce_sum(std::span<int64_t> data) { do_all_reduce(data.data(), data.size(), DType::i64, ReduceOp::sum); }
void Comm::all_reduce_max(std::span<float> data) { do_all_reduce(data.data(), data.size(), DType::f32, ReduceOp::max); }
void Comm::all_reduce_max(std::span<double> data) { do_all_reduce(data.data(), data.size(), DType::f64, ReduceOp::max); }
void Comm::all_reduce_max(std::span<int64_t> data) { do_all_reduce(data.data(), data.size(), DType::i64, ReduceOp::max); }

void Comm::all_gather(std::span<const std::byte> send, std::span<std::byte> recv) {
  Q3VL_CHECK(recv.size() == send.size() * static_cast<size_t>(size()), "parallel: all_gather: recv holds ",
             recv.size(), " bytes, expected ", size(), " ranks x ", send.size(), " bytes sent");
  do_all_gather(send.data(), recv.data(), send.size());
}

void Comm::reduce_scatter_sum(std::span<const float> send, std::span<float> recv) {
  Q3VL_CHECK(send.size() == recv.size() * static_cast<size_t>(size()), "parallel: reduce_scatter_sum: send holds ",
             send.size(), " elements, expected ", size(), " ranks x ", recv.size(), " (recv)");
  do_reduce_scatter_sum(send.data(), recv.data(), recv.size(), DType::f32);
}

void Comm::reduce_scatter_sum(std::span<const double> send, std::span<double> recv) {
  Q3VL_CHECK(send.size() == recv.size() * static_cast<size_t>(size()), "parallel: reduce_scatter_sum: send holds ",
             send.size(), " elements, expected ", size(), " ranks x ", recv.size(), " (recv)");
  do_reduce_scatter_sum(send.data(), recv.data(), recv.size(), DType::f64);
}

void Comm::all_to_all_v(std::span<const std::byte> send, std::span<const int64_t> send_counts,
                        std::span<const int64_t> send_displs, std::span<std::byte> recv,
                        std::span<const int64_t> recv_counts, std::span<const int64_t> recv_displs) {
  check_blocks("send", send_counts, send_displs, send.size(), size());
  check_blocks("recv", recv_counts, recv_displs, recv.size(), size());
  do_all_to_all_v(send.data(), send_counts.data(), send_displs.data(), recv.data(), recv_counts.data(),
                  recv_displs.data());
}

std::vector<std::string> Comm::gather_strings(const std::string& mine, int root) {
  check_root("gather_strings", root);
  return do_gather_strings(mine, root);
}

std::unique_ptr<Comm> Comm::split(int color, int key) {
  Q3VL_CHECK(color >= 0, "parallel: split: color must be non-negative, got ", color);
  return do_split(color, key);
}

std::vector<int64_t> exchange_counts(Comm& comm, std::span<const int64_t> send_counts) {
  const int n = comm.size();
  Q3VL_CHECK(send_counts.size() == static_cast<size_t>(n), "parallel: exchange_counts: ", send_counts.size(),
             " counts, expected one per rank (", n, ")");
  std::vector<int64_t> received(n), block(n, sizeof(int64_t)), displs(n);
  for (int r = 0; r < n; ++r) displs[r] = r * static_cast<int64_t>(sizeof(int64_t));
  comm.all_to_all_v(std::as_bytes(send_counts), block, displs, std::as_writable_bytes(std::span(received)), block,
                    displs);
  return received;
}

AllToAllResult all_to_all_v_with_counts(Comm& comm, std::span<const std::byte> send,
                                        std::span<const int64_t> send_counts) {
  const int n = comm.size();
  Q3VL_CHECK(send_counts.size() == static_cast<size_t>(n), "parallel: all_to_all_v_with_counts: ",
             send_counts.size(), " counts, expected one per rank (", n, ")");
  std::vector<int64_t> send_displs(n);
  int64_t total = 0;
  for (int r = 0; r < n; ++r) {
    Q3VL_CHECK(send_counts[r] >= 0, "parallel: all_to_all_v_with_counts: negative count ", send_counts[r],
               " for rank ", r);
    send_displs[r] = total;
    total += send_counts[r];
  }
  Q3VL_CHECK(static_cast<size_t>(total) == send.size(), "parallel: all_to_all_v_with_counts: counts add up to ",
             total, " bytes but send holds ", send.size());
  AllToAllResult result;
  result.counts = exchange_counts(comm, send_counts);
  result.displs.resize(n);
  int64_t received = 0;
  for (int r = 0; r < n; ++r) {
    result.displs[r] = received;
    received += result.counts[r];
  }
  result.data.resize(received);
  comm.all_to_all_v(send, send_counts, send_displs, result.data, result.counts, result.displs);
  return result;
}

}  // namespace q3vl::parallel
