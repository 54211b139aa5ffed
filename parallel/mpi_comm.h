// MPI behind Comm: MpiSession starts MPI (when this process was launched by mpirun/srun, or a test needs it)
// and hands out the world communicator; split() gives sub-communicators. mpi.h stays out of this header so
// the libraries that use a Comm do not see MPI.
//
// Communicators return MPI errors (MPI_ERRORS_RETURN, also on MPI_COMM_WORLD) and every call turns a failure
// into q3vl::Error naming the operation. A rank that fails on its own must not leave the others waiting in a
// collective: abort_all() ends the whole job.
#pragma once

#include <memory>
#include <string>

#include "parallel/comm.h"

namespace q3vl::parallel {

class MpiSession {
 public:
  // MPI_Init_thread(FUNNELED: OpenMP threads compute, the main thread communicates) unless MPI is already
  // initialised, in which case the session only checks the thread level and will not finalise.
  MpiSession();
  // Frees the world communicator, then MPI_Finalize if this session initialised MPI. Communicators from
  // split() must be destroyed before.
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  // True when a process manager started this process as an MPI rank (OpenMPI's mpirun, a PMI or PMIx
  // launcher such as Slurm's srun), read from the environment without touching MPI.
  static bool launched_by_mpirun();

  // A duplicate of MPI_COMM_WORLD, so that q3vl's messages never match another library's.
  Comm& world();

 private:
  bool initialised_here_ = false;
  std::unique_ptr<Comm> world_;
};

// Throws q3vl::Error "parallel: <operation>: MPI error <code>: <MPI's text>" unless code is MPI_SUCCESS.
void check_mpi(int code, const char* operation);

// Prints "rank R: reason" to stderr and ends every rank of the job (MPI_Abort on MPI_COMM_WORLD); without
// MPI, prints "rank 0: reason" and exits with status 1.
[[noreturn]] void abort_all(const std::string& reason);

}  // namespace q3vl::parallel
