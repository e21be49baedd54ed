# Why: the one call a plugin's CMakeLists.txt needs: keel_add_plugin(NAME SOURCES...) builds
# keel_plugin_NAME.so (the file name `keel --plugin SLOT=NAME` looks for) as a module linked against the SDK and
# LibTorch, with only the handshake exported. Set KEEL_PLUGIN_OUTPUT_DIR to choose where the .so goes.
function(keel_add_plugin name)
  if(NOT ARGN)
    message(FATAL_ERROR "keel_add_plugin(${name}): no sources")
  endif()
  set(target keel_plugin_${name})
  add_library(${target} MODULE ${ARGN})
  target_link_libraries(${target} PRIVATE KeelSDK::sdk)
  set_target_properties(${target} PROPERTIES
    PREFIX "" OUTPUT_NAME keel_plugin_${name}
    CXX_STANDARD 17 CXX_STANDARD_REQUIRED ON CXX_EXTENSIONS OFF
    CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)
  if(KEEL_PLUGIN_OUTPUT_DIR)
    set_target_properties(${target} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${KEEL_PLUGIN_OUTPUT_DIR})
  endif()
endfunction()
