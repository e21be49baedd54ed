// Why: see report_assets.h. `.incbin` copies each file into .rodata of this object, between a begin and an end
// symbol; KEEL_REPORT_SOURCE_DIR (core/report, from the generated keel/config.h; core/CMakeLists.txt makes this
// object depend on the files) says where they are at build time. A NUL byte follows each file so a
// string_view over [begin, end) is also a C string, though nothing relies on that.
#include "core/report/report_assets.h"

#include "keel/config.h"

#define KEEL_EMBED_FILE(symbol, relative_path)              \
  __asm__(                                                  \
      ".pushsection .rodata\n"                              \
      ".global " #symbol                                    \
      "_begin\n"                                            \
      ".hidden " #symbol                                    \
      "_begin\n"                                            \
      ".balign 16\n" #symbol                                \
      "_begin:\n"                                           \
      ".incbin \"" KEEL_REPORT_SOURCE_DIR "/" relative_path \
      "\"\n"                                                \
      ".global " #symbol                                    \
      "_end\n"                                              \
      ".hidden " #symbol "_end\n" #symbol                   \
      "_end:\n"                                             \
      ".byte 0\n"                                           \
      ".popsection\n");                                     \
  extern "C" const char symbol##_begin[];                   \
  extern "C" const char symbol##_end[];

KEEL_EMBED_FILE(keel_report_page_template, "page/report.html")
KEEL_EMBED_FILE(keel_report_page_style, "page/report.css")
KEEL_EMBED_FILE(keel_report_page_script, "page/report.js")
KEEL_EMBED_FILE(keel_report_chart_library, "vendor/echarts/echarts.min.js")

namespace keel::report {

namespace {
std::string_view between(const char* begin, const char* end) {
  return std::string_view(begin, static_cast<size_t>(end - begin));
}
}  // namespace

std::string_view page_template() { return between(keel_report_page_template_begin, keel_report_page_template_end); }
std::string_view page_style() { return between(keel_report_page_style_begin, keel_report_page_style_end); }
std::string_view page_script() { return between(keel_report_page_script_begin, keel_report_page_script_end); }
std::string_view chart_library() { return between(keel_report_chart_library_begin, keel_report_chart_library_end); }

}  // namespace keel::report
