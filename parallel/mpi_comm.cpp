// MpiComm (Comm over an MPI communicator), MpiSession, check_mpi and abort_all. MPI counts and displacements
// are int: a transfer whose per-rank block (or total, for variable-size operations) does not fit is refused
// with a message rather than truncated.
#include "parallel/mpi_comm.h"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "core/check.h"

namespace q3vl::parallel {

namespace {

int to_int(int64_t n, const char* operation, const char* what) {
  Q3VL_CHECK(n >= 0 && n <= INT_MAX, "parallel: ", operation, ": ", what, " ", n,
             " exceeds MPI's int count limit; split the transfer");
  return static_cast<int>(n);
}

MPI_Datatype mpi_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::i64: return MPI_INT64_T;
    default: Q3VL_FAIL("parallel: no MPI type for ", dtype_name(dtype));
  }
}

class MpiComm final : public Comm {
 public:
  // Takes ownership of comm (freed on destruction) and makes it return errors instead of aborting.
  explicit MpiComm(MPI_Comm comm) : comm_(comm) {
    check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    // Four int arrays of one entry per rank for all_to_all_v, so a call does not allocate.
    scratch_.resize(4 * static_cast<size_t>(size_));
  }

  ~MpiComm() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  // Polls a non-blocking barrier with growing sleeps (at most 1 ms) instead of MPI's busy wait, so a rank
  // that arrives early leaves its core to the ranks still working (several ranks per core, shared nodes).
  void barrier() override {
    MPI_Request request = MPI_REQUEST_NULL;
    check_mpi(MPI_Ibarrier(comm_, &request), "barrier");
    std::chrono::microseconds pause(1);
    for (;;) {
      int done = 0;
      check_mpi(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "barrier");
      if (done) return;
      std::this_thread::sleep_for(pause);
      pause = std::min(2 * pause, std::chrono::microseconds(1000));
    }
  }

 protected:
  void do_broadcast(void* data, size_t bytes, int root) override {
    check_mpi(MPI_Bcast(data, to_int(bytes, "broadcast", "byte count"), MPI_BYTE, root, comm_), "broadcast");
  }

  void do_all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    const char* name = op == ReduceOp::sum ? "all_reduce_sum" : "all_reduce_max";
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, data, to_int(count, name, "element count"), mpi_type(dtype),
                            op == ReduceOp::sum ? MPI_SUM : MPI_MAX, comm_),
              name);
  }

  void do_all_gather(const std::byte* send, std::byte* recv, size_t bytes_per_rank) override {
    const int n = to_int(bytes_per_rank, "all_gather", "bytes per rank");
    check_mpi(MPI_Allgather(send, n, MPI_BYTE, recv, n, MPI_BYTE, comm_), "all_gather");
  }

  void do_reduce_scatter_sum(const void* send, void* recv, size_t block, DType dtype) override {
    check_mpi(MPI_Reduce_scatter_block(send, recv, to_int(block, "reduce_scatter_sum", "block size"),
                                       mpi_type(dtype), MPI_SUM, comm_),
              "reduce_scatter_sum");
  }

  void do_all_to_all_v(const std::byte* send, const int64_t* send_counts, const int64_t* send_displs,
                       std::byte* recv, const int64_t* recv_counts, const int64_t* recv_displs) override {
    int* sc = scratch_.data();
    int* sd = sc + size_;
    int* rc = sd + size_;
    int* rd = rc + size_;
    for (int r = 0; r < size_; ++r) {
      // Displacement plus count bounds the block's end, so checking the end covers both.
      to_int(send_displs[r] + send_counts[r], "all_to_all_v", "send block end (bytes)");
      to_int(recv_displs[r] + recv_counts[r], "all_to_all_v", "recv block end (bytes)");
      sc[r] = static_cast<int>(send_counts[r]);
      sd[r] = static_cast<int>(send_displs[r]);
      rc[r] = static_cast<int>(recv_counts[r]);
      rd[r] = static_cast<int>(recv_displs[r]);
    }
    check_mpi(MPI_Alltoallv(send, sc, sd, MPI_BYTE, recv, rc, rd, MPI_BYTE, comm_), "all_to_all_v");
  }

  std::vector<std::string> do_gather_strings(const std::string& mine, int root) override {
    const int64_t length = static_cast<int64_t>(mine.size());
    to_int(length, "gather_strings", "string length");
    std::vector<int64_t> lengths(rank_ == root ? size_ : 0);
    check_mpi(MPI_Gather(&length, 1, MPI_INT64_T, lengths.data(), 1, MPI_INT64_T, root, comm_), "gather_strings");
    std::vector<int> counts, displs;
    std::string all;
    if (rank_ == root) {
      counts.resize(size_);
      displs.resize(size_);
      int64_t total = 0;
      for (int r = 0; r < size_; ++r) {
        counts[r] = static_cast<int>(lengths[r]);
        displs[r] = to_int(total, "gather_strings", "total bytes before a rank's string");
        total += lengths[r];
      }
      all.resize(total);
    }
    check_mpi(MPI_Gatherv(mine.data(), static_cast<int>(length), MPI_CHAR, all.data(), counts.data(),
                          displs.data(), MPI_CHAR, root, comm_),
              "gather_strings");
    std::vector<std::string> out;
    if (rank_ == root)
      for (int r = 0; r < size_; ++r) out.push_back(all.substr(displs[r], counts[r]));
    return out;
  }

  std::unique_ptr<Comm> do_split(int color, int key) override {
    MPI_Comm sub = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(comm_, color, key, &sub), "split");
    return std::make_unique<MpiComm>(sub);
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  std::vector<int> scratch_;
};

}  // namespace

void check_mpi(int code, const char* operation) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  Q3VL_FAIL("parallel: ", operation, ": MPI error ", code, ": ", std::string(text, length));
}

MpiSession::MpiSession() {
  int initialised = 0, finalised = 0;
  check_mpi(MPI_Initialized(&initialised), "MPI_Initialized");
  check_mpi(MPI_Finalized(&finalised), "MPI_Finalized");
  Q3VL_CHECK(!finalised, "parallel: MPI was already finalised in this process and cannot start again");
  int provided = MPI_THREAD_SINGLE;
  if (!initialised) {
    check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    initialised_here_ = true;
  } else {
    check_mpi(MPI_Query_thread(&provided), "MPI_Query_thread");
  }
  try {
    Q3VL_CHECK(provided >= MPI_THREAD_FUNNELED, "parallel: MPI provides thread level ", provided,
               ", below MPI_THREAD_FUNNELED");
    check_mpi(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    MPI_Comm dup = MPI_COMM_NULL;
    check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &dup), "MPI_Comm_dup");
    world_ = std::make_unique<MpiComm>(dup);
  } catch (...) {
    if (initialised_here_) MPI_Finalize();
    throw;
  }
}

MpiSession::~MpiSession() {
  world_.reset();
  if (initialised_here_) MPI_Finalize();
}

bool MpiSession::launched_by_mpirun() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(name) != nullptr) return true;
  return false;
}

Comm& MpiSession::world() { return *world_; }

void abort_all(const std::string& reason) {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  const bool running = initialised && !finalised;
  int rank = 0;
  if (running) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // One write, so that the line reaches mpirun whole rather than interleaved with other ranks' output.
  const std::string line = "rank " + std::to_string(rank) + ": " + reason + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
  if (running) MPI_Abort(MPI_COMM_WORLD, 1);
  std::_Exit(1);
}

}  // namespace q3vl::parallel
