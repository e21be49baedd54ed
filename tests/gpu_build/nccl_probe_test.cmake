# Why: KEEL_NCCL's probe (cmake/KeelNccl.cmake) decides whether a CUDA build has NCCL process groups; a wrong
# answer breaks the whole build on the lent GPU machine, where nccl.h may sit only in the nvidia-nccl wheel.
# Run in script mode: cmake -DKEEL_SOURCE_DIR=<repo> -DWORK_DIR=<scratch> -P nccl_probe_test.cmake
# Each case that must stop configuration runs in a child cmake (-DCASE=<name>) whose failure is checked.
cmake_minimum_required(VERSION 3.22)
include(${KEEL_SOURCE_DIR}/cmake/KeelNccl.cmake)
unset(ENV{NCCL_INCLUDE_DIR})
unset(ENV{NCCL_HOME})

set(site "${WORK_DIR}/site-packages")
set(wheel_include "${site}/nvidia/nccl/include")
set(empty "${WORK_DIR}/empty-site/site-packages")

function(expect actual expected what)
  if(NOT "${actual}" STREQUAL "${expected}")
    message(FATAL_ERROR "nccl probe: ${what}: expected '${expected}', got '${actual}'")
  endif()
endfunction()

if(DEFINED CASE)  # a child run: a case that must fail configuration
  if(CASE STREQUAL "on_missing")
    keel_nccl_candidates(dirs "${empty}/torch" "" "${WORK_DIR}/no-toolkit")
    keel_resolve_nccl(ON ON "${dirs}" with include)
  elseif(CASE STREQUAL "on_without_cuda")
    keel_resolve_nccl(ON OFF "${wheel_include}" with include)
  elseif(CASE STREQUAL "bad_mode")
    keel_resolve_nccl(maybe ON "${wheel_include}" with include)
  endif()
  return()
endif()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${site}/torch" "${empty}/torch" "${WORK_DIR}/env-include")
file(WRITE "${wheel_include}/nccl.h" "/* test */\n")
file(WRITE "${WORK_DIR}/env-include/nccl.h" "/* test */\n")

# The wheel's header beside torch is found from the torch package's folder.
keel_nccl_candidates(dirs "${site}/torch" "" "${WORK_DIR}/no-toolkit")
keel_resolve_nccl(AUTO ON "${dirs}" with include)
expect("${with}" ON "AUTO with the wheel's nccl.h")
expect("${include}" "${wheel_include}" "the folder found")
# Absent everywhere: AUTO builds without NCCL (a warning, no error).
keel_nccl_candidates(dirs "${empty}/torch" "" "${WORK_DIR}/no-toolkit")
keel_resolve_nccl(AUTO ON "${dirs}" with include)
expect("${with}" OFF "AUTO without nccl.h")
expect("${include}" "" "no folder")
# OFF never builds NCCL; a CPU build never does either.
keel_resolve_nccl(OFF ON "${wheel_include}" with include)
expect("${with}" OFF "KEEL_NCCL=OFF")
keel_resolve_nccl(AUTO OFF "${wheel_include}" with include)
expect("${with}" OFF "AUTO in a CPU build")
# $NCCL_INCLUDE_DIR comes first.
set(ENV{NCCL_INCLUDE_DIR} "${WORK_DIR}/env-include")
keel_nccl_candidates(dirs "${site}/torch" "" "")
keel_resolve_nccl(ON ON "${dirs}" with include)
expect("${include}" "${WORK_DIR}/env-include" "NCCL_INCLUDE_DIR first")
unset(ENV{NCCL_INCLUDE_DIR})

foreach(case_and_message IN ITEMS "on_missing|KEEL_NCCL=ON but nccl.h was not found (searched: "
                                  "on_without_cuda|KEEL_NCCL=ON needs a CUDA build" "bad_mode|KEEL_NCCL must be AUTO, ON or OFF, got 'maybe'")
  string(REPLACE "|" ";" parts "${case_and_message}")
  list(GET parts 0 case)
  list(GET parts 1 wanted)
  execute_process(COMMAND ${CMAKE_COMMAND} -DKEEL_SOURCE_DIR=${KEEL_SOURCE_DIR} -DWORK_DIR=${WORK_DIR} -DCASE=${case}
                          -P ${CMAKE_CURRENT_LIST_FILE}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(rc EQUAL 0)
    message(FATAL_ERROR "nccl probe: case ${case} configured, but must stop with '${wanted}'")
  endif()
  string(REGEX REPLACE "[ \t\r\n]+" " " err "${err}")  # CMake wraps its messages
  string(FIND "${err}" "${wanted}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "nccl probe: case ${case} failed without '${wanted}':\n${err}")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}")
message(STATUS "nccl probe: all cases pass")
