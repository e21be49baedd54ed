// Why: every JSON text a checkpoint holds (manifest, lineage, LR schedule, data ledger, optimizer and plugin state)
// comes from disk: it may have been edited by hand, or written with a NaN that nlohmann serialises as null. A
// wrong type must be one line that names the file and the field ("FILE: field 'lr': expected a number, got
// null"), never nlohmann's "[json.exception.type_error.302] type must be number, but is null". Every read of
// checkpoint JSON goes through these helpers, which throw CheckpointError and nothing else. Torch-free.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace keel::checkpoint {

// Parses `text` as one JSON object; throws CheckpointError("ORIGIN: not valid JSON (...)") or
// "ORIGIN: expected a JSON object, got TYPE".
nlohmann::json parse_json_object(const std::string& text, const std::string& origin);

// "null", "a string", "2.5", "an array", ... (what a type error says it got). Inline: the manifest parser's fuzz
// target compiles manifest.cpp without this header's .cpp.
inline std::string describe_json_value(const nlohmann::json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::null:
      return "null";
    case nlohmann::json::value_t::boolean:
      return value.get<bool>() ? "true" : "false";
    case nlohmann::json::value_t::string:
      return "a string";
    case nlohmann::json::value_t::array:
      return "an array";
    case nlohmann::json::value_t::object:
      return "an object";
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
    case nlohmann::json::value_t::number_float:
      return value.dump();
    default:
      return "nothing";
  }
}

// The first null anywhere inside `value` (a NaN or Inf that nlohmann wrote as null), as a field path
// ("weights.code", "sources[1].epoch"), or nullopt. `path` is the path of `value` itself ("" for the root).
std::optional<std::string> find_null(const nlohmann::json& value, const std::string& path = "");

// Typed access to the fields of one JSON object. `origin` names the file (and the object inside it, e.g.
// "ckpt/rank-00000.h5:/lr_schedule"); `path` is this object's own field path inside it ("" for the root,
// "parent", "changes[2]"). A field that is present with the wrong type (null included) always throws, also in
// the *_or forms; only an absent field takes the fallback.
class JsonFields {
 public:
  // Throws "ORIGIN: field 'PATH': expected an object, got ..." when `object` is not an object.
  JsonFields(const nlohmann::json& object, std::string origin, std::string path = "");

  bool has(const std::string& name) const;
  // "PATH.NAME" (or "NAME" at the root).
  std::string path_of(const std::string& name) const;
  const std::string& origin() const { return origin_; }

  double number(const std::string& name) const;
  double number_or(const std::string& name, double fallback) const;
  int64_t integer(const std::string& name) const;
  int64_t integer_or(const std::string& name, int64_t fallback) const;
  std::string string(const std::string& name) const;
  std::string string_or(const std::string& name, const std::string& fallback) const;
  bool boolean(const std::string& name) const;
  bool boolean_or(const std::string& name, bool fallback) const;
  // The field itself, any type (missing: throws).
  const nlohmann::json& value(const std::string& name) const;
  // A nested object.
  JsonFields object(const std::string& name) const;
  // The elements of an array of objects ("NAME[i]" in messages); an absent field is an empty list in the _or form.
  std::vector<JsonFields> objects(const std::string& name) const;
  std::vector<JsonFields> objects_or_empty(const std::string& name) const;
  // An array of strings; an absent field is an empty list in the _or form.
  std::vector<std::string> strings(const std::string& name) const;
  std::vector<std::string> strings_or_empty(const std::string& name) const;

  // Throws "ORIGIN: field 'PATH.NAME': WHAT".
  [[noreturn]] void fail(const std::string& name, const std::string& what) const;

 private:
  const nlohmann::json* find(const std::string& name) const;
  const nlohmann::json& require(const std::string& name) const;
  [[noreturn]] void wrong_type(const std::string& name, const char* expected, const nlohmann::json& got) const;

  const nlohmann::json& object_;
  std::string origin_;
  std::string path_;
};

}  // namespace keel::checkpoint
