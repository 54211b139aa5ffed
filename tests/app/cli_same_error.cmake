# q3vl train --dry-run stops on the same error as the run itself, in its first second (tests/app/cli.cmake): both
# exit 1 with the same one stderr line, which must match EXPECT (a regular expression).
# Run with cmake -P: -DQ3VL=<q3vl binary> -DCONFIG=<yaml> -DEXPECT=<regex> -DSETS=<;-list of --set arguments>.
cmake_minimum_required(VERSION 3.25)
execute_process(COMMAND ${Q3VL} train ${CONFIG} ${SETS} --dry-run RESULT_VARIABLE dry_rc ERROR_VARIABLE dry_err
                OUTPUT_VARIABLE dry_out)
execute_process(COMMAND ${Q3VL} train ${CONFIG} ${SETS} RESULT_VARIABLE run_rc ERROR_VARIABLE run_err
                OUTPUT_VARIABLE run_out)
if(NOT dry_rc EQUAL 1 OR NOT run_rc EQUAL 1 OR NOT dry_err STREQUAL run_err OR NOT dry_err MATCHES "${EXPECT}")
  message(FATAL_ERROR "dry run: exit ${dry_rc}, stderr '${dry_err}'\nrun: exit ${run_rc}, stderr '${run_err}'\n"
                      "expected both to exit 1 with the same line matching '${EXPECT}'")
endif()
string(REGEX MATCHALL "\n" newlines "${dry_err}")
list(LENGTH newlines n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR "expected one stderr line, got ${n}: '${dry_err}'")
endif()
message(STATUS "dry run and run both: ${dry_err}")
