# q3vl train --print-config round trip (tests/app/cli.cmake): the resolved config of CONFIG with --set overrides,
# loaded back and printed again, gives the same text; the overrides show in it, and without CONFIG the defaults print.
# Run with cmake -P: -DQ3VL=<q3vl binary> -DCONFIG=<yaml> -DWORK=<scratch folder>.
cmake_minimum_required(VERSION 3.25)
file(MAKE_DIRECTORY ${WORK})
execute_process(COMMAND ${Q3VL} train ${CONFIG} --set train.steps=17 --set=optimizer.lr_scale.mergers=0.25
                        --set data.dir=${WORK}/data --set optimizer.freeze=[vision_tower] --print-config
                RESULT_VARIABLE rc OUTPUT_VARIABLE first ERROR_VARIABLE err)
if(NOT rc EQUAL 0 OR NOT err STREQUAL "")
  message(FATAL_ERROR "--print-config: exit ${rc}: ${err}")
endif()
foreach(expected "\n  steps: 17 " "\n    mergers: 0.25 " "\n  freeze: \\[vision_tower\\] " "\n  dir: \"?${WORK}/data\"? ")
  if(NOT first MATCHES "${expected}")
    message(FATAL_ERROR "--print-config does not show '${expected}':\n${first}")
  endif()
endforeach()
file(WRITE ${WORK}/printed.yaml "${first}")
execute_process(COMMAND ${Q3VL} train ${WORK}/printed.yaml --print-config RESULT_VARIABLE rc OUTPUT_VARIABLE second
                ERROR_VARIABLE err)
if(NOT rc EQUAL 0 OR NOT second STREQUAL first)
  message(FATAL_ERROR "the printed config does not read back to the same config (exit ${rc}: ${err}):\n"
                      "first:\n${first}\nsecond:\n${second}")
endif()
execute_process(COMMAND ${Q3VL} train --print-config RESULT_VARIABLE rc OUTPUT_VARIABLE defaults ERROR_VARIABLE err)
if(NOT rc EQUAL 0 OR NOT defaults MATCHES "\n  steps: 100 +# optimizer steps\n")
  message(FATAL_ERROR "q3vl train --print-config without a config: exit ${rc}: ${err}\n${defaults}")
endif()
message(STATUS "--print-config round trip: ${WORK}/printed.yaml")
