// Why: a shared library that is not a Keel plugin at all (no keel_plugin_info). Keel must say so.
extern "C" __attribute__((visibility("default"))) int some_other_library_function() { return 42; }
