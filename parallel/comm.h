// Comm: the collective operations q3vl's parallel layer needs (FSDP gathers and reduce-scatters, expert
// all-to-all, statistics), behind one interface so that MPI (mpi_comm.h) now and NCCL later implement it, and
// a single process runs with SelfComm (self_comm.h). core never sees MPI: layers take a Comm&.
//
// Every public operation checks its arguments (sizes, ranks, buffer bounds) with Q3VL_CHECK, naming the
// operation, before any backend runs; backend failures are q3vl::Error too. Collectives are called by every
// rank of the communicator in the same order with matching sizes (the usual SPMD contract).
//
// Determinism: a reduction gives bitwise the same result on every rank, and the same result on every run
// with the same communicator layout and buffer sizes (the backend picks its algorithm from those alone). The
// order in which ranks' contributions are added may differ between layouts (2 ranks vs 4, or different
// splits), so fp32 sums agree across layouts only to rounding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace q3vl::parallel {

class Comm {
 public:
  Comm() = default;
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;
  virtual ~Comm() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Returns once every rank has entered it. The MPI backend waits without spinning, so a rank that finished
  // early can wait here (before a gather, say) without taking CPU from ranks that share its core.
  virtual void barrier() = 0;

  // Root's `bytes` bytes at `data` are copied to `data` on every rank.
  void broadcast(void* data, size_t bytes, int root);

  // In place: every rank ends with the element-wise sum (max) over ranks.
  void all_reduce_sum(std::span<float> data);
  void all_reduce_sum(std::span<double> data);
  void all_reduce_sum(std::span<int64_t> data);
  void all_reduce_max(std::span<float> data);
  void all_reduce_max(std::span<double> data);
  void all_reduce_max(std::span<int64_t> data);

  // Every rank contributes send (the same byte count on all ranks); recv (size() * send.size() bytes)
  // receives the contributions in rank order.
  void all_gather(std::span<const std::byte> send, std::span<std::byte> recv);
  template <class T>
  void all_gather(std::span<const T> send, std::span<T> recv) {
    all_gather(std::as_bytes(send), std::as_writable_bytes(recv));
  }

  // send holds size() equal blocks of recv.size() elements; rank r receives the sum over ranks of block r.
  void reduce_scatter_sum(std::span<const float> send, std::span<float> recv);
  void reduce_scatter_sum(std::span<const double> send, std::span<double> recv);

  // Personalised exchange in bytes: send_counts[r] bytes from send + send_displs[r] go to rank r, and
  // recv_counts[r] bytes from rank r land at recv + recv_displs[r]. recv_counts[r] on this rank must equal
  // send_counts[this rank] on rank r (exchange_counts() provides them).
  void all_to_all_v(std::span<const std::byte> send, std::span<const int64_t> send_counts,
                    std::span<const int64_t> send_displs, std::span<std::byte> recv,
                    std::span<const int64_t> recv_counts, std::span<const int64_t> recv_displs);

  // Strings of any length, one per rank, collected on root in rank order; other ranks get an empty vector.
  std::vector<std::string> gather_strings(const std::string& mine, int root);

  // MPI_Comm_split semantics: ranks with the same color (>= 0) form a communicator, ordered by key and then
  // by rank in this one. Every rank gets one.
  std::unique_ptr<Comm> split(int color, int key);

 protected:
  enum class ReduceOp { sum, max };
  // Arguments reach these already checked against each other and against size().
  virtual void do_broadcast(void* data, size_t bytes, int root) = 0;
  virtual void do_all_reduce(void* data, size_t count, DType dtype, ReduceOp op) = 0;
  virtual void do_all_gather(const std::byte* send, std::byte* recv, size_t bytes_per_rank) = 0;
  virtual void do_reduce_scatter_sum(const void* send, void* recv, size_t block, DType dtype) = 0;
  virtual void do_all_to_all_v(const std::byte* send, const int64_t* send_counts, const int64_t* send_displs,
                               std::byte* recv, const int64_t* recv_counts, const int64_t* recv_displs) = 0;
  virtual std::vector<std::string> do_gather_strings(const std::string& mine, int root) = 0;
  virtual std::unique_ptr<Comm> do_split(int color, int key) = 0;

 private:
  void check_root(const char* operation, int root) const;
};

// Every rank learns how many bytes each other rank will send it: the result's entry r on this rank is
// send_counts[this rank] on rank r.
std::vector<int64_t> exchange_counts(Comm& comm, std::span<const int64_t> send_counts);

// What all_to_all_v_with_counts() received: the blocks from ranks 0..size-1 back to back.
struct AllToAllResult {
  std::vector<std::byte> data;
  std::vector<int64_t> counts, displs;  // bytes from rank r: data[displs[r], displs[r] + counts[r])
};

// The counts exchange and the data exchange in one: send holds the blocks for ranks 0..size-1 back to back,
// send_counts[r] bytes each (they must add up to send.size()).
AllToAllResult all_to_all_v_with_counts(Comm& comm, std::span<const std::byte> send,
                                        std::span<const int64_t> send_counts);

}  // namespace q3vl::parallel
