# `q3vl pack` under mpiexec against a single-process pack of the same input (run with cmake -P):
# the MPI run must print one summary (rank 0's), its manifest must list every rank's shards (and they must
# exist), and the counts in both manifests' summaries must agree. It also runs into an existing pack: refused
# without --overwrite, replaced whole with it.
# Variables: Q3VL, MPIEXEC, NUMPROC_FLAG, RANKS, PREFLAGS and INPUTS (;-lists), TOKENIZER, WORK_DIR.
cmake_minimum_required(VERSION 3.25)
foreach(v Q3VL MPIEXEC NUMPROC_FLAG RANKS INPUTS TOKENIZER WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "pack_mpi: -D${v}=... is required")
  endif()
endforeach()

file(REMOVE_RECURSE ${WORK_DIR})
set(one ${WORK_DIR}/one_rank)
set(many ${WORK_DIR}/${RANKS}_ranks)
set(input_args "")
foreach(input IN LISTS INPUTS)
  list(APPEND input_args --input ${input})
endforeach()

execute_process(COMMAND ${Q3VL} pack ${input_args} --tokenizer ${TOKENIZER} --out ${one} --quiet
                RESULT_VARIABLE rc OUTPUT_VARIABLE out_one ERROR_VARIABLE err_one)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pack_mpi: the single-process pack failed (${rc}):\n${out_one}\n${err_one}")
endif()
# The MPI run's output already holds a pack (a copy of the single-process one): refused without --overwrite
# (the earlier pack stays), replaced with it, and no staging folder is left beside it.
file(COPY ${one}/ DESTINATION ${many})
file(WRITE ${many}/marker "earlier pack")
execute_process(COMMAND ${MPIEXEC} ${NUMPROC_FLAG} ${RANKS} ${PREFLAGS}
                        ${Q3VL} pack ${input_args} --tokenizer ${TOKENIZER} --out ${many} --quiet
                RESULT_VARIABLE rc OUTPUT_VARIABLE out_refused ERROR_VARIABLE err_refused)
if(rc EQUAL 0 OR NOT err_refused MATCHES "is not empty \\(an earlier pack\\?\\); pass --overwrite" OR NOT EXISTS ${many}/marker)
  message(FATAL_ERROR "pack_mpi: a ${RANKS}-rank pack into an existing pack was not refused (${rc}):\n${err_refused}")
endif()
execute_process(COMMAND ${MPIEXEC} ${NUMPROC_FLAG} ${RANKS} ${PREFLAGS}
                        ${Q3VL} pack ${input_args} --tokenizer ${TOKENIZER} --out ${many} --overwrite --quiet
                RESULT_VARIABLE rc OUTPUT_VARIABLE out_many ERROR_VARIABLE err_many)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pack_mpi: the ${RANKS}-rank pack failed (${rc}):\n${out_many}\n${err_many}")
endif()
file(GLOB leftovers ${WORK_DIR}/*.tmp-* ${WORK_DIR}/*.old-*)
if(EXISTS ${many}/marker OR leftovers)
  message(FATAL_ERROR "pack_mpi: --overwrite kept the earlier pack's files or left folders behind: ${leftovers}")
endif()
message(STATUS "single process:\n${out_one}")
message(STATUS "${RANKS} ranks:\n${out_many}")

string(REGEX MATCHALL "samples in [0-9]+" summaries "${out_many}")
list(LENGTH summaries n_summaries)
if(NOT n_summaries EQUAL 1)
  message(FATAL_ERROR "pack_mpi: expected one summary (rank 0's) from the ${RANKS}-rank run, got ${n_summaries}")
endif()

file(READ ${one}/manifest.json manifest_one)
file(READ ${many}/manifest.json manifest_many)
string(JSON n_shards LENGTH "${manifest_many}" shards)
math(EXPR last "${n_shards} - 1")
set(ranks_seen "")
foreach(i RANGE ${last})
  string(JSON file GET "${manifest_many}" shards ${i} file)
  if(NOT EXISTS ${many}/${file})
    message(FATAL_ERROR "pack_mpi: the manifest lists ${file}, which is not in ${many}")
  endif()
  string(REGEX REPLACE "^shard-0*([0-9]+)-[0-9]+\\.h5$" "\\1" rank "${file}")
  list(APPEND ranks_seen ${rank})
endforeach()
math(EXPR last_rank "${RANKS} - 1")
foreach(r RANGE ${last_rank})
  if(NOT r IN_LIST ranks_seen)
    message(FATAL_ERROR "pack_mpi: the manifest lists no shard of rank ${r} (shards of ranks: ${ranks_seen})")
  endif()
endforeach()

foreach(key samples_in samples_packed tokens images video_frames)
  string(JSON a GET "${manifest_one}" summary ${key})
  string(JSON b GET "${manifest_many}" summary ${key})
  if(NOT a EQUAL b)
    message(FATAL_ERROR "pack_mpi: summary ${key}: ${a} on one process, ${b} on ${RANKS} ranks")
  endif()
endforeach()
string(JSON skipped_one GET "${manifest_one}" summary skipped)
string(JSON skipped_many GET "${manifest_many}" summary skipped)
string(JSON same EQUAL "${skipped_one}" "${skipped_many}")
if(NOT same)
  message(FATAL_ERROR "pack_mpi: skip counts differ:\none process: ${skipped_one}\n${RANKS} ranks: ${skipped_many}")
endif()
message(STATUS "pack_mpi: ${n_shards} shards from ${RANKS} ranks; counts equal the single-process pack")
