# Why: shared target settings (warnings, sanitizers) in one helper so that every Keel target is built alike.
# Sanitizer findings must fail the test that triggers them, so UBSan does not recover (it aborts like ASan does).
# The runtime options the suite runs with are in scripts/asan.sh (see docs/testing.md).
function(keel_target_defaults target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter)
  if(KEEL_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=address,undefined -fno-sanitize-recover=all
                                             -fno-omit-frame-pointer)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined -fno-sanitize-recover=all)
  endif()
endfunction()
