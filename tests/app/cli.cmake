# The command line of every q3vl subcommand (included by tests/CMakeLists.txt): --help, a wrong option and a
# missing file (app/cli_command.cmake); the top-level help and --version (app/cli_help_options.cmake); the
# --print-config round trip (app/cli_print_config.cmake); --dry-run stopping on the run's own first errors
# (app/cli_same_error.cmake) and, on packed data, planning a run without writing anything.
set(Q3VL_CLI_WORK ${CMAKE_BINARY_DIR}/cli_tests)
set(Q3VL_TOKENIZER_DIR ${PROJECT_SOURCE_DIR}/tests/shared/assets/qwen3-tokenizer)
set(Q3VL_CLI_MISSING_train /nonexistent/config.yaml)
set(Q3VL_CLI_MISSING_convert --checkpoint /nonexistent/run --out ${Q3VL_CLI_WORK}/convert)
set(Q3VL_CLI_MISSING_forward --model /nonexistent/model --batch /nonexistent/batch.h5 --out ${Q3VL_CLI_WORK}/f.h5)
set(Q3VL_CLI_MISSING_plan --model /nonexistent/config.json)
set(Q3VL_CLI_MISSING_pack --input /nonexistent/samples.jsonl --tokenizer ${Q3VL_TOKENIZER_DIR}
    --out ${Q3VL_CLI_WORK}/packed)
set(Q3VL_CLI_MISSING_tokenize --tokenizer /nonexistent/tokenizer.json)
# selfcheck reads no file: its wrong-value case is a usage error, checked with the wrong option.
foreach(command train convert selfcheck forward plan pack tokenize)
  add_test(NAME app_cli_${command}
           COMMAND ${CMAKE_COMMAND} -DQ3VL=$<TARGET_FILE:q3vl> -DCOMMAND=${command}
                   "-DMISSING_ARGS=${Q3VL_CLI_MISSING_${command}}" -DMISSING_NAME=/nonexistent/
                   -P ${CMAKE_CURRENT_SOURCE_DIR}/app/cli_command.cmake)
endforeach()
add_test(NAME app_cli_help_lists_options
         COMMAND ${CMAKE_COMMAND} -DQ3VL=$<TARGET_FILE:q3vl> -DSOURCE_DIR=${PROJECT_SOURCE_DIR}
                 -P ${CMAKE_CURRENT_SOURCE_DIR}/app/cli_help_options.cmake)
add_test(NAME app_cli_pack_version COMMAND q3vl-pack --version)
set_tests_properties(app_cli_pack_version PROPERTIES PASS_REGULAR_EXPRESSION "^q3vl-pack [0-9]+\\.[0-9]+\\.[0-9]+ \\(git ")
add_test(NAME app_cli_print_config_round_trip
         COMMAND ${CMAKE_COMMAND} -DQ3VL=$<TARGET_FILE:q3vl> -DCONFIG=${CMAKE_CURRENT_SOURCE_DIR}/app/dp_equivalence.yaml
                 -DWORK=${Q3VL_CLI_WORK}/print_config -P ${CMAKE_CURRENT_SOURCE_DIR}/app/cli_print_config.cmake)
# The first errors a run meets: its data missing, and a layout the ranks cannot form (fsdp 3 on one rank).
add_test(NAME app_cli_dry_run_missing_data
         COMMAND ${CMAKE_COMMAND} -DQ3VL=$<TARGET_FILE:q3vl> -DCONFIG=${CMAKE_CURRENT_SOURCE_DIR}/app/dp_equivalence.yaml
                 "-DSETS=--set;data.dir=/nonexistent/packed;--set;output_dir=${Q3VL_CLI_WORK}/dry_missing"
                 "-DEXPECT=^q3vl train: .*/nonexistent/packed" -P ${CMAKE_CURRENT_SOURCE_DIR}/app/cli_same_error.cmake)
add_test(NAME app_cli_dry_run_bad_layout
         COMMAND ${CMAKE_COMMAND} -DQ3VL=$<TARGET_FILE:q3vl> -DCONFIG=${CMAKE_CURRENT_SOURCE_DIR}/app/dp_equivalence.yaml
                 "-DSETS=--set;data.dir=/nonexistent/packed;--set;parallel.fsdp=3;--set;output_dir=${Q3VL_CLI_WORK}/dry_layout"
                 "-DEXPECT=^q3vl train: .*3" -P ${CMAKE_CURRENT_SOURCE_DIR}/app/cli_same_error.cmake)
# On the packed captions of the data-parallel runs: the plan is printed, and no output folder appears.
add_test(NAME app_cli_dry_run_plans
         COMMAND sh -c "\"$0\" train \"$1\" --set data.dir=\"$2\" --set output_dir=\"$3\" --dry-run && test ! -e \"$3\""
                 $<TARGET_FILE:q3vl> ${CMAKE_CURRENT_SOURCE_DIR}/app/dp_equivalence.yaml ${Q3VL_DP_DIR}/packed
                 ${Q3VL_CLI_WORK}/dry_plan)
set_tests_properties(app_cli_dry_run_plans PROPERTIES FIXTURES_REQUIRED dp_data
                     PASS_REGULAR_EXPRESSION "dry run: .*nothing was written.*tokens per optimizer step")
