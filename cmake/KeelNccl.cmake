# Why: the NCCL process groups need nccl.h (c10d's ProcessGroupNCCL.hpp includes it), and PyTorch's
# nvidia-nccl wheel may not ship it where the compiler looks: it sits under site-packages/nvidia/nccl/include
# beside torch, or in the CUDA toolkit, or nowhere. KEEL_NCCL=AUTO builds the NCCL groups when the header is
# found and says so when it is not (parallel.backend = nccl is then refused with a clear error); ON requires it;
# OFF never builds them. Functions only: the caller decides (cmake/KeelDependencies.cmake), and
# tests/gpu_build/nccl_probe_test.cmake drives them in script mode.

# The folders where nccl.h may be, in search order: $NCCL_INCLUDE_DIR, $NCCL_HOME/include, the nvidia-nccl
# wheel beside the torch package of `torch_prefix` (…/site-packages/torch -> …/site-packages/nvidia/nccl/include),
# the same under every Python site-packages `python` reports (when given), then the CUDA toolkit's folders.
function(keel_nccl_candidates out_var torch_prefix python toolkit_dirs)
  set(dirs)
  if(DEFINED ENV{NCCL_INCLUDE_DIR} AND NOT "$ENV{NCCL_INCLUDE_DIR}" STREQUAL "")
    list(APPEND dirs "$ENV{NCCL_INCLUDE_DIR}")
  endif()
  if(DEFINED ENV{NCCL_HOME} AND NOT "$ENV{NCCL_HOME}" STREQUAL "")
    list(APPEND dirs "$ENV{NCCL_HOME}/include")
  endif()
  if(torch_prefix)
    get_filename_component(site "${torch_prefix}/.." ABSOLUTE)
    list(APPEND dirs "${site}/nvidia/nccl/include")
  endif()
  if(python)
    execute_process(COMMAND "${python}" -c "import site,sys; print(';'.join(site.getsitepackages() + [site.getusersitepackages()]))"
                    OUTPUT_VARIABLE sites OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE rc)
    if(rc EQUAL 0)
      foreach(site IN LISTS sites)
        list(APPEND dirs "${site}/nvidia/nccl/include")
      endforeach()
    endif()
  endif()
  list(APPEND dirs ${toolkit_dirs})
  list(REMOVE_DUPLICATES dirs)
  set(${out_var} "${dirs}" PARENT_SCOPE)
endfunction()

# Decides whether this build has NCCL. mode: AUTO, ON or OFF; with_cuda: whether this is a CUDA build.
# Sets <out_with> (ON/OFF) and <out_include> (the folder holding nccl.h, or "") in the caller's scope; ON with
# no header is a configure error naming every folder searched.
function(keel_resolve_nccl mode with_cuda candidates out_with out_include)
  string(TOUPPER "${mode}" upper)
  if(NOT upper MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "KEEL_NCCL must be AUTO, ON or OFF, got '${mode}'")
  endif()
  set(mode "${upper}")
  set(${out_with} OFF PARENT_SCOPE)
  set(${out_include} "" PARENT_SCOPE)
  if(mode STREQUAL "OFF")
    message(STATUS "Keel: NCCL off (KEEL_NCCL=OFF)")
    return()
  endif()
  if(NOT with_cuda)
    if(mode STREQUAL "ON")
      message(FATAL_ERROR "KEEL_NCCL=ON needs a CUDA build (KEEL_CUDA=ON with a CUDA LibTorch)")
    endif()
    return()
  endif()
  foreach(dir IN LISTS candidates)
    if(EXISTS "${dir}/nccl.h")
      set(${out_with} ON PARENT_SCOPE)
      set(${out_include} "${dir}" PARENT_SCOPE)
      message(STATUS "Keel: NCCL process groups on (nccl.h in ${dir})")
      return()
    endif()
  endforeach()
  string(REPLACE ";" ", " searched "${candidates}")
  if(mode STREQUAL "ON")
    message(FATAL_ERROR "KEEL_NCCL=ON but nccl.h was not found (searched: ${searched}); set NCCL_INCLUDE_DIR "
                        "to the folder holding it, or configure with -DKEEL_NCCL=OFF")
  endif()
  message(WARNING "Keel: nccl.h not found (searched: ${searched}): building WITHOUT NCCL; parallel.backend = nccl "
                  "will be refused (set NCCL_INCLUDE_DIR to the folder holding nccl.h, e.g. the nvidia-nccl wheel's include)")
endfunction()
