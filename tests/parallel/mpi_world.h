// The MPI world communicator of the q3vl_parallel_tests run (started by mpi_main.cpp), for the test cases.
#pragma once

#include "parallel/comm.h"

namespace q3vl::test {

parallel::Comm& mpi_world();

}  // namespace q3vl::test
