// Why: a `keel report` page must open offline, and `keel` must write one from any directory without the
// source tree. So the page's template, style, script and the vendored chart library (vendor/echarts/) are
// embedded into the binary at build time (report_assets.cpp, assembler .incbin) and read from here.
#pragma once

#include <string_view>

namespace keel::report {

std::string_view page_template();  // page/report.html, with {{PLACEHOLDERS}}
std::string_view page_style();     // page/report.css
std::string_view page_script();    // page/report.js
std::string_view chart_library();  // vendor/echarts/echarts.min.js (Apache-2.0, see vendor/echarts/LICENSE)

}  // namespace keel::report
