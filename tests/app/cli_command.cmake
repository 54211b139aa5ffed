# One q3vl subcommand's command line (tests/app/cli.cmake registers it for each): --help prints usage to stdout and
# exits 0; a wrong option exits 2 with exactly one stderr line naming it; a missing file (MISSING_ARGS, a ;-list;
# empty for a command that reads no file) exits 1 with exactly one stderr line and no source location in it.
# Run with cmake -P: -DQ3VL=<q3vl binary> -DCOMMAND=<name> [-DMISSING_ARGS=...] [-DMISSING_NAME=<path in the line>].
cmake_minimum_required(VERSION 3.25)

# Runs q3vl COMMAND ARGS...; sets rc, out, err and err_lines (stderr's lines) in the caller.
function(run_q3vl)
  execute_process(COMMAND ${Q3VL} ${COMMAND} ${ARGN} RESULT_VARIABLE r OUTPUT_VARIABLE o ERROR_VARIABLE e
                  INPUT_FILE /dev/null)
  string(REGEX REPLACE "\n$" "" trimmed "${e}")
  string(REPLACE "\n" ";" lines "${trimmed}")
  list(LENGTH lines n)
  if(trimmed STREQUAL "")
    set(n 0)
  endif()
  set(rc "${r}" PARENT_SCOPE)
  set(out "${o}" PARENT_SCOPE)
  set(err "${e}" PARENT_SCOPE)
  set(err_lines "${n}" PARENT_SCOPE)
endfunction()

set(failures "")
run_q3vl(--help)
if(NOT rc EQUAL 0 OR NOT out MATCHES "Usage: q3vl ${COMMAND}" OR NOT err STREQUAL "")
  string(APPEND failures "--help: exit ${rc}, stdout '${out}', stderr '${err}'\n")
endif()
run_q3vl(-h)
if(NOT rc EQUAL 0 OR NOT out MATCHES "Usage: q3vl ${COMMAND}")
  string(APPEND failures "-h: exit ${rc}, stdout '${out}'\n")
endif()

run_q3vl(--no-such-option 1)
if(NOT rc EQUAL 2 OR NOT err_lines EQUAL 1 OR NOT err MATCHES "^q3vl ${COMMAND}: unknown option '--no-such-option'")
  string(APPEND failures "wrong option: exit ${rc}, ${err_lines} stderr lines: '${err}'\n")
endif()

if(MISSING_ARGS)
  run_q3vl(${MISSING_ARGS})
  if(NOT rc EQUAL 1 OR NOT err_lines EQUAL 1 OR NOT err MATCHES "^q3vl ${COMMAND}: " OR err MATCHES "\\.(cpp|h):"
     OR NOT err MATCHES "${MISSING_NAME}")
    string(APPEND failures "missing file (${MISSING_ARGS}): exit ${rc}, ${err_lines} stderr lines: '${err}'\n")
  endif()
endif()

if(failures)
  message(FATAL_ERROR "q3vl ${COMMAND}:\n${failures}")
endif()
message(STATUS "q3vl ${COMMAND}: --help, a wrong option and a missing file answered as expected")
