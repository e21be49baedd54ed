// Why: see json_fields.h.
#include "core/checkpoint/json_fields.h"

#include <limits>

#include "core/checkpoint/checkpoint_error.h"

namespace keel::checkpoint {
using nlohmann::json;

json parse_json_object(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw CheckpointError(origin + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw CheckpointError(origin + ": expected a JSON object, got " + describe_json_value(j));
  return j;
}

std::optional<std::string> find_null(const json& value, const std::string& path) {
  if (value.is_null()) return path;
  if (value.is_object()) {
    for (const auto& [key, item] : value.items()) {
      if (auto hit = find_null(item, path.empty() ? key : path + "." + key)) return hit;
    }
  } else if (value.is_array()) {
    for (size_t i = 0; i < value.size(); ++i) {
      if (auto hit = find_null(value[i], path + "[" + std::to_string(i) + "]")) return hit;
    }
  }
  return std::nullopt;
}

JsonFields::JsonFields(const json& object, std::string origin, std::string path)
    : object_(object), origin_(std::move(origin)), path_(std::move(path)) {
  if (!object_.is_object()) {
    if (path_.empty()) throw CheckpointError(origin_ + ": expected a JSON object, got " + describe_json_value(object_));
    throw CheckpointError(origin_ + ": field '" + path_ + "': expected an object, got " + describe_json_value(object_));
  }
}

bool JsonFields::has(const std::string& name) const { return find(name) != nullptr; }

std::string JsonFields::path_of(const std::string& name) const { return path_.empty() ? name : path_ + "." + name; }

const json* JsonFields::find(const std::string& name) const {
  const auto it = object_.find(name);
  return it == object_.end() ? nullptr : &*it;
}

const json& JsonFields::require(const std::string& name) const {
  const json* v = find(name);
  if (v == nullptr) throw CheckpointError(origin_ + ": field '" + path_of(name) + "' is missing");
  return *v;
}

void JsonFields::fail(const std::string& name, const std::string& what) const {
  throw CheckpointError(origin_ + ": field '" + path_of(name) + "': " + what);
}

void JsonFields::wrong_type(const std::string& name, const char* expected, const json& got) const {
  fail(name, std::string("expected ") + expected + ", got " + describe_json_value(got));
}

double JsonFields::number(const std::string& name) const {
  const json& v = require(name);
  if (!v.is_number()) wrong_type(name, "a number", v);
  return v.get<double>();
}

double JsonFields::number_or(const std::string& name, double fallback) const {
  return has(name) ? number(name) : fallback;
}

int64_t JsonFields::integer(const std::string& name) const {
  const json& v = require(name);
  if (v.is_number_unsigned()) {
    if (v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(name, v.dump() + " is out of range");
    return static_cast<int64_t>(v.get<uint64_t>());
  }
  if (!v.is_number_integer()) wrong_type(name, "an integer", v);
  return v.get<int64_t>();
}

int64_t JsonFields::integer_or(const std::string& name, int64_t fallback) const {
  return has(name) ? integer(name) : fallback;
}

std::string JsonFields::string(const std::string& name) const {
  const json& v = require(name);
  if (!v.is_string()) wrong_type(name, "a string", v);
  return v.get<std::string>();
}

std::string JsonFields::string_or(const std::string& name, const std::string& fallback) const {
  return has(name) ? string(name) : fallback;
}

bool JsonFields::boolean(const std::string& name) const {
  const json& v = require(name);
  if (!v.is_boolean()) wrong_type(name, "true or false", v);
  return v.get<bool>();
}

bool JsonFields::boolean_or(const std::string& name, bool fallback) const {
  return has(name) ? boolean(name) : fallback;
}

const json& JsonFields::value(const std::string& name) const { return require(name); }

JsonFields JsonFields::object(const std::string& name) const {
  return JsonFields(require(name), origin_, path_of(name));
}

std::vector<JsonFields> JsonFields::objects(const std::string& name) const {
  const json& v = require(name);
  if (!v.is_array()) wrong_type(name, "an array", v);
  std::vector<JsonFields> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) out.emplace_back(v[i], origin_, path_of(name) + "[" + std::to_string(i) + "]");
  return out;
}

std::vector<JsonFields> JsonFields::objects_or_empty(const std::string& name) const {
  return has(name) ? objects(name) : std::vector<JsonFields>{};
}

std::vector<std::string> JsonFields::strings(const std::string& name) const {
  const json& v = require(name);
  if (!v.is_array()) wrong_type(name, "an array of strings", v);
  std::vector<std::string> out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_string()) wrong_type(name + "[" + std::to_string(i) + "]", "a string", v[i]);
    out.push_back(v[i].get<std::string>());
  }
  return out;
}

std::vector<std::string> JsonFields::strings_or_empty(const std::string& name) const {
  return has(name) ? strings(name) : std::vector<std::string>{};
}

}  // namespace keel::checkpoint
