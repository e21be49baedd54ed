// Why: see control.h.
#include "core/train/control.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "core/checkpoint/durable_fs.h"

namespace keel::train {
namespace {

namespace fs = std::filesystem;

// Text from a request file, fit to quote in a message: short and printable, or described instead.
std::string quote_request_text(const std::string& text) {
  const bool printable =
      text.size() <= 64 && std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isprint(c); });
  return printable ? "'" + text + "'" : "(" + std::to_string(text.size()) + " bytes that are not a short word)";
}

std::string with_extension(const std::string& request_path, const std::string& extension) {
  return request_path.substr(0, request_path.size() - std::string(".request").size()) + extension;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

std::vector<std::string> SwapRequest::overrides() const {
  std::vector<std::string> out{"plugins." + slot + "=" + plugin};
  for (const auto& arg : args) out.push_back("plugin." + arg);
  return out;
}

std::string format_swap_request(const SwapRequest& request) {
  std::ostringstream out;
  out << "swap " << request.slot << "=" << request.plugin << "\n";
  for (const auto& arg : request.args) out << "arg " << arg << "\n";
  if (request.at_step >= 0) out << "at_step " << request.at_step << "\n";
  return out.str();
}

SwapRequest parse_swap_request(const std::string& text) {
  SwapRequest request;
  std::istringstream in(text);
  std::string verb, value;
  while (in >> verb) {
    if (!(in >> value)) throw std::runtime_error("request line " + quote_request_text(verb) + " has no value");
    if (verb == "swap") {
      const auto eq = value.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == value.size())
        throw std::runtime_error("swap needs SLOT=NAME_OR_PATH, got " + quote_request_text(value));
      request.slot = value.substr(0, eq);
      request.plugin = value.substr(eq + 1);
    } else if (verb == "arg") {
      if (value.find('=') == std::string::npos)
        throw std::runtime_error("arg needs NAME.KEY=VALUE, got " + quote_request_text(value));
      request.args.push_back(value);
    } else if (verb == "at_step") {
      if (value.empty() || value.size() > 18 || value.find_first_not_of("0123456789") != std::string::npos)
        throw std::runtime_error("at_step needs a step number, got " + quote_request_text(value));
      request.at_step = std::stoll(value);
    } else {
      throw std::runtime_error("unknown request line " + quote_request_text(verb));
    }
  }
  if (request.slot.empty()) throw std::runtime_error("no swap line");
  return request;
}

std::string write_swap_request(const std::string& control_dir, const SwapRequest& request) {
  fs::create_directories(control_dir);
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const std::string path = control_dir + "/" +
                           std::to_string(std::chrono::duration_cast<std::chrono::microseconds>(now).count()) +
                           ".request";
  checkpoint::write_file_atomically(path, format_swap_request(request));
  return path;
}

std::vector<PendingRequest> read_pending_requests(const std::string& control_dir) {
  std::vector<PendingRequest> out;
  std::error_code ec;
  if (!fs::is_directory(control_dir, ec)) return out;
  for (const auto& item : fs::directory_iterator(control_dir, ec)) {
    if (item.path().extension() == ".request" && item.is_regular_file(ec)) out.push_back({item.path().string(), ""});
  }
  std::sort(out.begin(), out.end(), [](const PendingRequest& a, const PendingRequest& b) { return a.path < b.path; });
  for (auto& request : out) request.text = read_file(request.path);
  return out;
}

void mark_request_done(const std::string& request_path) {
  std::error_code ec;
  fs::rename(request_path, with_extension(request_path, ".done"), ec);
}

void mark_request_refused(const std::string& request_path, const std::string& reason) {
  std::error_code ec;
  try {
    checkpoint::write_file_atomically(with_extension(request_path, ".refused"), reason + "\n");
  } catch (const std::exception&) {
  }
  fs::remove(request_path, ec);
}

std::optional<std::string> request_outcome(const std::string& request_path) {
  std::error_code ec;
  if (fs::exists(with_extension(request_path, ".done"), ec)) return std::string("done");
  const std::string refused = with_extension(request_path, ".refused");
  if (fs::exists(refused, ec)) {
    std::string reason = read_file(refused);
    while (!reason.empty() && (reason.back() == '\n' || reason.back() == '\r')) reason.pop_back();
    return "refused: " + reason;
  }
  if (fs::exists(request_path, ec)) return std::nullopt;
  return std::string("refused: the request file disappeared without an answer");
}

}  // namespace keel::train
