// Why: see report_page.h.
#include "core/report/report_page.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <limits>
#include <stdexcept>

#include "core/io/file.h"
#include "core/report/precursors.h"
#include "core/report/report_assets.h"
#include "keel/version.h"

namespace keel::report {

namespace fs = std::filesystem;

namespace {

nlohmann::json number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

nlohmann::json numbers(const std::vector<TrainRow>& rows, double TrainRow::*field) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& r : rows) out.push_back(number(r.*field));
  return out;
}

nlohmann::json steps_of(const std::vector<TrainRow>& rows) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& r : rows) out.push_back(r.step);
  return out;
}

nlohmann::json lineage_json(const checkpoint::Lineage& l) {
  nlohmann::json j{{"run_id", l.run_id},
                   {"run_dir", l.run_dir},
                   {"kind", l.kind()},
                   {"notes", l.notes},
                   {"changes", nlohmann::json::array()}};
  for (const auto& c : l.changes) j["changes"].push_back({{"key", c.key}, {"from", c.from}, {"to", c.to}});
  j["parent"] = l.is_root() ? nlohmann::json(nullptr)
                            : nlohmann::json{{"run_id", l.parent_run_id},
                                             {"run_dir", l.parent_run_dir},
                                             {"checkpoint", l.parent_checkpoint},
                                             {"step", l.parent_step}};
  return j;
}

// Layer x step heatmaps of /stats/ (null when the run logged none).
nlohmann::json precursors_json(const PrecursorStats& p) {
  if (p.empty()) return nullptr;
  const auto grid = [](const std::vector<std::vector<double>>& rows) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& row : rows) {
      nlohmann::json r = nlohmann::json::array();
      for (double v : row) r.push_back(number(v));
      out.push_back(std::move(r));
    }
    return out;
  };
  nlohmann::json z = nlohmann::json::array();
  for (double v : p.z_max) z.push_back(number(v));
  return {
      {"steps", p.steps}, {"attn_logit_max", grid(p.attn_logit_max)}, {"block_rms", grid(p.block_rms)}, {"z_max", z}};
}

// The colour scale every run's heatmap of one quantity shares: [lowest, highest] finite value over all runs.
nlohmann::json shared_scale(const std::vector<RunData>& runs, std::vector<std::vector<double>> PrecursorStats::*field) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& run : runs)
    for (const auto& row : run.precursors.*field)
      for (double v : row)
        if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  if (!(lo <= hi)) return nullptr;
  return {lo, hi};
}

nlohmann::json run_json(const RunData& run) {
  nlohmann::json j{{"name", run.name}, {"dir", run.dir}, {"arm", run.arm.arm}, {"seed", run.arm.seed}};
  j["steps"] = steps_of(run.rows);
  j["loss"] = numbers(run.rows, &TrainRow::loss);
  j["grad_norm"] = numbers(run.rows, &TrainRow::grad_norm);
  j["lr"] = numbers(run.rows, &TrainRow::lr);
  j["tokens_per_s"] = numbers(run.rows, &TrainRow::tokens_per_s);
  nlohmann::json skipped = nlohmann::json::array();
  for (const auto& r : run.rows) {
    if (r.skipped) skipped.push_back(r.step);
  }
  j["skipped_steps"] = skipped;
  j["final_train_loss"] = number(final_train_loss(run.rows));
  j["superseded"] = {{"step", steps_of(run.superseded)},
                     {"loss", numbers(run.superseded, &TrainRow::loss)},
                     {"grad_norm", numbers(run.superseded, &TrainRow::grad_norm)},
                     {"lr", numbers(run.superseded, &TrainRow::lr)},
                     {"tokens_per_s", numbers(run.superseded, &TrainRow::tokens_per_s)}};
  j["events"] = nlohmann::json::array();
  for (const auto& e : run.events) j["events"].push_back({{"step", e.step}, {"kind", e.kind}, {"text", e.text}});
  if (run.heatmap.empty()) {
    j["heatmap"] = nullptr;
  } else {
    nlohmann::json cells = nlohmann::json::array();
    for (const auto& row : run.heatmap.log10_grad_norm) {
      nlohmann::json r = nlohmann::json::array();
      for (double v : row) r.push_back(std::isfinite(v) ? nlohmann::json(std::round(v * 1e4) / 1e4) : nlohmann::json());
      cells.push_back(std::move(r));
    }
    j["heatmap"] = {{"tensors", run.heatmap.tensor_names},
                    {"first_step", run.heatmap.column_first_step},
                    {"last_step", run.heatmap.column_last_step},
                    {"log10", std::move(cells)}};
  }
  // Per-source loss: one series per source, aligned with "steps" (null where the source had no sample).
  if (run.source_names.empty()) {
    j["source_loss"] = nullptr;
  } else {
    nlohmann::json series = nlohmann::json::array();
    for (size_t c = 0; c < run.source_names.size(); ++c) {
      nlohmann::json values = nlohmann::json::array();
      for (const auto& row : run.source_loss) values.push_back(number(row[c]));
      series.push_back(std::move(values));
    }
    j["source_loss"] = {{"sources", run.source_names}, {"loss", std::move(series)}};
  }
  j["precursors"] = precursors_json(run.precursors);
  j["spikes"] = nlohmann::json::array();
  for (const SpikeRow& spike : spike_rows(run)) {
    nlohmann::json top = nlohmann::json::array();
    for (const auto& [source, rise] : spike.top_sources) top.push_back({{"source", source}, {"rise", number(rise)}});
    j["spikes"].push_back({{"step", spike.step},
                           {"detector", spike.detector},
                           {"action", spike.action},
                           {"z", number(spike.z)},
                           {"text", spike.text},
                           {"top_sources", std::move(top)}});
  }
  j["lineage"] = run.lineage ? lineage_json(*run.lineage) : nlohmann::json(nullptr);
  j["evals"] = nlohmann::json::array();
  for (const auto& e : run.evals) {
    nlohmann::json sources = nlohmann::json::array();
    for (const auto& s : e.sources) {
      sources.push_back({{"source", s.source},
                         {"nll", number(s.nll)},
                         {"perplexity", number(s.perplexity)},
                         {"tokens", s.tokens},
                         {"seen_in_training", s.seen_in_training}});
    }
    j["evals"].push_back({{"step", e.step}, {"file", e.file}, {"sources", std::move(sources)}});
  }
  return j;
}

std::string utc_now() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace

nlohmann::json report_json(const std::vector<RunData>& runs, const AbTable& table, const std::string& title) {
  nlohmann::json j{{"title", title}, {"generated_utc", utc_now()}, {"keel_version", KEEL_VERSION}};
  j["runs"] = nlohmann::json::array();
  for (const auto& run : runs) j["runs"].push_back(run_json(run));
  j["ab"] = ab_table_json(table);  // the same object `keel report --json` prints
  j["precursor_scale"] = {{"attn_logit_max", shared_scale(runs, &PrecursorStats::attn_logit_max)},
                          {"block_rms", shared_scale(runs, &PrecursorStats::block_rms)}};
  return j;
}

std::string html_escape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string json_for_script(const nlohmann::json& value) {
  // Invalid UTF-8 (e.g. a cut event text from an old file) is replaced rather than thrown on.
  const std::string text = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '<' && i + 1 < text.size() && text[i + 1] == '/') {
      out += "<\\/";
      ++i;
    } else if (text.compare(i, 3, "\xE2\x80\xA8") == 0) {
      out += "\\u2028";
      i += 2;
    } else if (text.compare(i, 3, "\xE2\x80\xA9") == 0) {
      out += "\\u2029";
      i += 2;
    } else {
      out += text[i];
    }
  }
  return out;
}

std::string render_page(const nlohmann::json& report, const std::string& title) {
  const std::string_view tmpl = page_template();
  const std::string data = json_for_script(report);
  std::string out;
  out.reserve(tmpl.size() + chart_library().size() + data.size() + page_script().size() + page_style().size());
  // Only the template is scanned for placeholders: the inlined library and data are copied verbatim.
  size_t pos = 0;
  while (true) {
    const size_t open = tmpl.find("{{", pos);
    if (open == std::string_view::npos) break;
    const size_t close = tmpl.find("}}", open);
    if (close == std::string_view::npos) throw std::logic_error("report template: unclosed {{ placeholder");
    out.append(tmpl.substr(pos, open - pos));
    const std::string_view name = tmpl.substr(open + 2, close - open - 2);
    if (name == "TITLE")
      out += html_escape(title);
    else if (name == "STYLE")
      out.append(page_style());
    else if (name == "CHART_LIBRARY")
      out.append(chart_library());
    else if (name == "DATA")
      out += data;
    else if (name == "SCRIPT")
      out.append(page_script());
    else
      throw std::logic_error("report template: unknown placeholder {{" + std::string(name) + "}}");
    pos = close + 2;
  }
  out.append(tmpl.substr(pos));
  return out;
}

void write_page(const std::string& path, const std::string& html) {
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  if (!fs::is_directory(dir)) throw std::runtime_error(path + ": directory " + dir.string() + " does not exist");
  if (fs::is_directory(target)) throw std::runtime_error(path + ": is a directory");
  // PATH is the old page or the whole new one, no PATH.tmp-PID is left behind, and the OS error is kept:
  // "report: cannot write PATH: No space left on device".
  try {
    io::write_file_atomically(path, html);
  } catch (const io::FileError& e) {
    throw std::runtime_error("report: cannot write " + path + ": " + e.reason());
  }
}

}  // namespace keel::report
