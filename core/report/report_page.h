// Why: the second half of `keel report`: the gathered runs and the A/B table become one JSON document, and that
// document plus the embedded template, style, script and chart library (report_assets.h) become one
// self-contained HTML page. The JSON is the page's only input, so what the page shows can be checked without a
// browser (tests/unit/test_report.cpp) and the page script stays free of any Keel knowledge but this format.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/report/ab_stats.h"
#include "core/report/run_data.h"

namespace keel::report {

// The report data: {title, generated_utc, keel_version, runs: [...], ab: {...}} (docs/report.md). NaN and
// infinities become null.
nlohmann::json report_json(const std::vector<RunData>& runs, const AbTable& table, const std::string& title);

// The whole page: the template with the title (HTML-escaped), style, chart library, data (JSON made safe
// inside a <script> element) and script filled in.
std::string render_page(const nlohmann::json& report, const std::string& title);

// `text` with &, <, >, " and ' as HTML entities.
std::string html_escape(const std::string& text);
// JSON text that cannot end the <script> element holding it ("</" becomes "<\/", and U+2028/U+2029 escaped).
std::string json_for_script(const nlohmann::json& value);

// Writes `html` to `path` atomically (a temporary file in the same directory, then rename): an existing report
// is replaced only by a complete one. Throws std::runtime_error naming the path.
void write_page(const std::string& path, const std::string& html);

}  // namespace keel::report
