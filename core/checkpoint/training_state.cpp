// Why: see training_state.h. The HDF5 layout of a rank file (docs/checkpoints.md):
//   /                      attrs format, format_version, keel_version, step, tokens_seen, rank, world_size,
//                          tensors_finite (1: every model and optimizer tensor was checked finite before writing)
//   /model/<param>         fp32 master weights
//   /optimizer             attrs name, step; /optimizer/state_json; /optimizer/state/<param>/<exp_avg|...>
//   /lr_schedule           JSON text
//   /rng/cpu, /rng/cuda/<device>   uint8 generator states
//   /data/ledger           JSON text (the data ledger)
//   /config                INI text (the resolved config)
//   /lineage               JSON text
//   /plugins/<slot>/<name> attrs version; state (JSON text), tensors/<tensor name>
// Nothing non-finite is written: a NaN/Inf model or optimizer tensor, or a JSON text holding null (how nlohmann
// writes a NaN), refuses the save before the file is created. Reading checks every JSON text field by field, so
// that a damaged or hand-edited value is an error naming the file, the object and the field.
#include "core/checkpoint/training_state.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_writer.h"
#include "core/checkpoint/h5_file.h"
#include "core/checkpoint/json_fields.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/resharding.h"
#include "keel/version.h"

namespace keel::checkpoint {
namespace {

constexpr const char* kRankFileFormat = "keel-checkpoint-rank";

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    case at::kLong:
      return DType::kInt64;
    case at::kInt:
      return DType::kInt32;
    case at::kByte:
      return DType::kUInt8;
    default:
      throw CheckpointError(std::string("cannot checkpoint a tensor of dtype ") + c10::toString(t.scalar_type()));
  }
}

at::ScalarType scalar_type_of(DType d) {
  switch (d) {
    case DType::kFloat32:
      return at::kFloat;
    case DType::kFloat64:
      return at::kDouble;
    case DType::kBFloat16:
      return at::kBFloat16;
    case DType::kFloat16:
      return at::kHalf;
    case DType::kInt64:
      return at::kLong;
    case DType::kInt32:
      return at::kInt;
    case DType::kUInt8:
      return at::kByte;
  }
  throw CheckpointError("unknown dtype");
}

RawTensor to_raw(const at::Tensor& tensor) {
  const at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
  RawTensor raw;
  raw.dtype = dtype_of(t);
  raw.shape = t.sizes().vec();
  raw.bytes.resize(t.numel() * t.element_size());
  if (!raw.bytes.empty()) std::memcpy(raw.bytes.data(), t.data_ptr(), raw.bytes.size());
  return raw;
}

at::Tensor from_raw(const RawTensor& raw) {
  at::Tensor t = torch::empty(raw.shape, torch::TensorOptions().dtype(scalar_type_of(raw.dtype)));
  if (!raw.bytes.empty()) std::memcpy(t.data_ptr(), raw.bytes.data(), raw.bytes.size());
  return t;
}

// `placement_prefix` ("model/", "optimizer/"; "" = always whole) selects the tensors' placement entries. With a
// `source`, tensor i is source(i) (the streaming writer: `tensors` only name them), dropped once written.
void write_named(H5Writer& out, const std::string& group, const NamedTensors& tensors,
                 const std::map<std::string, Placement>& placement = {}, const std::string& placement_prefix = "",
                 const TensorSource* source = nullptr) {
  out.create_group(group);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string& name = tensors[i].first;
    RawTensor raw = to_raw(source ? (*source)(i) : tensors[i].second);
    if (!placement_prefix.empty()) {
      const auto it = placement.find(placement_prefix + name);
      if (it != placement.end()) {
        raw.global_shape = it->second.global_shape;
        raw.offset = it->second.offset;
      }
    }
    out.write_tensor(group + "/" + name, raw);
  }
}

// With `data` false the tensors are placeholders on the meta device (shape and dtype, no bytes read): the
// streaming reader (resharding.h) reads the parts it needs later.
NamedTensors read_named(const H5Reader& in, const std::string& group,
                        std::map<std::string, Placement>* placement = nullptr, const std::string& placement_prefix = "",
                        bool data = true) {
  NamedTensors out;
  for (const auto& name : in.datasets_under(group)) {
    RawTensor raw = data ? in.read_tensor(group + "/" + name) : in.tensor_info(group + "/" + name);
    if (placement && raw.global_shape != raw.shape)
      placement->emplace(placement_prefix + name, Placement{raw.global_shape, raw.offset});
    out.emplace_back(
        name,
        data ? from_raw(raw)
             : torch::empty(raw.shape, torch::TensorOptions().dtype(scalar_type_of(raw.dtype)).device(torch::kMeta)));
  }
  return out;
}

// True when no element is NaN or +-Inf. One reduction where the tensor lives (aminmax propagates NaN) and one
// copy of its two results to the host: no per-element transfer and no full-size temporary, also for GBs of state.
bool all_finite(const at::Tensor& tensor) {
  if (!tensor.defined() || tensor.numel() == 0 || !at::isFloatingType(tensor.scalar_type())) return true;
  const auto [lo, hi] = at::aminmax(tensor.detach());
  const at::Tensor both = at::stack({lo.reshape({1}), hi.reshape({1})}).to(at::kCPU, at::kDouble);
  const double* v = both.data_ptr<double>();
  return std::isfinite(v[0]) && std::isfinite(v[1]);
}

std::string refusal_prefix(const TrainingState& s) {
  return "cannot save checkpoint step " + std::to_string(s.step) + ": ";
}

// What write_rank_file refuses to write, tensor by tensor: a non-finite one.
void check_finite(const at::Tensor& tensor, const std::string& kind, const std::string& name, const TrainingState& s,
                  const std::string& path) {
  if (!all_finite(tensor)) {
    throw CheckpointError(refusal_prefix(s) + kind + " tensor " + name + " holds NaN/Inf (" +
                          std::filesystem::path(path).filename().string() + ")");
  }
}

// What write_rank_file refuses to write besides tensors: JSON that is malformed or holds null.
void check_savable_json(const TrainingState& s, const std::string& path) {
  const std::string file = std::filesystem::path(path).filename().string();
  const std::string prefix = refusal_prefix(s);
  auto check_json = [&](const std::string& text, const std::string& what) {
    if (text.empty()) return;
    try {
      const nlohmann::json j = parse_json_object(text, what);
      if (const auto null = find_null(j)) {
        throw CheckpointError(what + ": field '" + *null + "' is null (a NaN or Inf written as JSON)");
      }
    } catch (const CheckpointError& e) {
      throw CheckpointError(prefix + e.what() + " (" + file + ")");
    }
  };
  check_json(s.optimizer_json, "optimizer " + s.optimizer_name + " state");
  check_json(s.lr_schedule, "/lr_schedule");
  check_json(s.data_ledger, "/data/ledger");
  for (const auto& p : s.plugins) check_json(p.json, "plugin " + p.name + " state");
}

// What write_rank_file refuses to write: a non-finite tensor, or JSON that is malformed or holds null.
void check_savable(const TrainingState& s, const std::string& path) {
  for (const auto& [name, tensor] : s.model) check_finite(tensor, "model", name, s, path);
  for (const auto& [name, tensor] : s.optimizer) check_finite(tensor, "optimizer", name, s, path);
  check_savable_json(s, path);
}

// A plugin's (or the optimizer's) JSON state: an object of numbers and small lists (sdk PluginState); a null is
// a NaN or Inf that was written as JSON.
void check_state_json(const std::string& text, const std::string& origin) {
  if (text.empty()) return;
  const nlohmann::json j = parse_json_object(text, origin);
  const JsonFields f(j, origin);
  if (f.has("step") && f.integer("step") < 0) f.fail("step", "is negative");
  if (const auto null = find_null(j))
    throw CheckpointError(origin + ": field '" + *null + "': expected a number, got null");
}

void check_lr_schedule(const std::string& text, const std::string& origin) {
  const nlohmann::json j = parse_json_object(text, origin);
  const JsonFields f(j, origin);
  for (const char* name : {"kind", "lr_schedule_plugin"}) f.string_or(name, "");
  for (const char* name : {"lr", "min_lr", "lr_factor"}) f.number_or(name, 0.0);
  for (const char* name : {"warmup_steps", "decay_steps", "next_step", "lr_factor_until"}) f.integer_or(name, 0);
  if (const auto null = find_null(j))
    throw CheckpointError(origin + ": field '" + *null + "': expected a number, got null");
}

// Every field the data loader reads from the ledger (docs/data.md), typed; the loader checks the values.
void check_ledger(const std::string& text, const std::string& origin) {
  const nlohmann::json j = parse_json_object(text, origin);
  const JsonFields f(j, origin);
  f.string_or("format", "");
  for (const char* name : {"version", "step", "next_sample", "global_batch", "seed", "seq_len", "chunks"})
    f.integer_or(name, 0);
  for (const JsonFields& source : f.objects_or_empty("sources")) {
    source.string("name");
    for (const char* name : {"epoch", "position", "consumed", "skipped", "samples_per_epoch"})
      source.integer_or(name, 0);
  }
  for (const JsonFields& stage : f.objects_or_empty("mixture_history")) {
    stage.integer("from_step");
    stage.string_or("origin", "");
    const JsonFields weights = stage.object("weights");
    for (const auto& [name, value] : stage.value("weights").items()) weights.number(name);
  }
  for (const JsonFields& rule : f.objects_or_empty("skip")) {
    rule.string("spec");
    rule.integer("from_step");
    rule.integer("to_step");
  }
  for (const auto& [name, value] : j.items()) {
    if (name == "fingerprint") continue;  // the data's own description, compared as a whole
    if (const auto null = find_null(value, name))
      throw CheckpointError(origin + ": field '" + *null + "': expected a number, got null");
  }
}

}  // namespace

namespace {

// The rank file's objects in their one order; model and optimizer tensors from the sources when given.
void write_rank_file_contents(H5Writer& out, const TrainingState& s, RankInfo rank, const TensorSource* model,
                              const TensorSource* optimizer) {
  out.set_attribute("/", "format", kRankFileFormat);
  out.set_attribute("/", "format_version", int64_t{kCheckpointFormatVersion});
  out.set_attribute("/", "keel_version", KEEL_VERSION);
  out.set_attribute("/", "step", s.step);
  out.set_attribute("/", "tokens_seen", s.tokens_seen);
  out.set_attribute("/", "rank", rank.rank);
  out.set_attribute("/", "world_size", rank.world_size);
  out.set_attribute("/", "tensors_finite", int64_t{1});

  write_named(out, "/model", s.model, s.placement, "model/", model);
  out.create_group("/optimizer");
  out.set_attribute("/optimizer", "name", s.optimizer_name);
  out.set_attribute("/optimizer", "step", s.optimizer_step);
  out.write_text("/optimizer/state_json", s.optimizer_json);
  write_named(out, "/optimizer/state", s.optimizer, s.placement, "optimizer/", optimizer);
  out.write_text("/lr_schedule", s.lr_schedule);

  out.create_group("/rng");
  if (s.cpu_rng.defined()) out.write_tensor("/rng/cpu", to_raw(s.cpu_rng));
  for (size_t i = 0; i < s.cuda_rng.size(); ++i)
    out.write_tensor("/rng/cuda/" + std::to_string(i), to_raw(s.cuda_rng[i]));

  out.write_text("/data/ledger", s.data_ledger);
  out.write_text("/config", s.config_ini);
  out.write_text("/lineage", s.lineage);

  out.create_group("/plugins");
  for (const auto& p : s.plugins) {
    const std::string group = "/plugins/" + p.slot + "/" + p.name;
    out.create_group(group);
    out.set_attribute(group, "name", p.name);
    out.set_attribute(group, "version", p.version);
    out.write_text(group + "/state", p.json);
    write_named(out, group + "/tensors", p.tensors);
  }
}

// `source`, checked: tensor i must have the shape and dtype of placeholder `names[i]` and be finite.
TensorSource checked_source(const TensorSource& source, const NamedTensors& names, const std::string& kind,
                            const TrainingState& s, const std::string& path) {
  return [&source, &names, kind, &s, path](size_t i) {
    at::Tensor t = source(i);
    const auto& [name, placeholder] = names.at(i);
    if (!t.defined() || t.sizes() != placeholder.sizes() || t.scalar_type() != placeholder.scalar_type()) {
      throw CheckpointError(path + ": " + kind + " tensor " + name + " came as " +
                            (t.defined() ? c10::str(t.sizes()) + " " + c10::toString(t.scalar_type()) : "nothing") +
                            ", expected " + c10::str(placeholder.sizes()) + " " +
                            c10::toString(placeholder.scalar_type()));
    }
    check_finite(t, kind, name, s, path);
    return t;
  };
}

}  // namespace

void write_rank_file(const std::string& path, const TrainingState& s, RankInfo rank) {
  check_savable(s, path);  // before the file exists: a refused save leaves nothing behind
  H5Writer out(path);
  write_rank_file_contents(out, s, rank, nullptr, nullptr);
  out.close();
}

void write_rank_file_streaming(const std::string& path, const TrainingState& s, RankInfo rank,
                               const TensorSource& model, const TensorSource& optimizer) {
  check_savable_json(s, path);  // before the file exists
  const TensorSource checked_model = checked_source(model, s.model, "model", s, path);
  const TensorSource checked_optimizer = checked_source(optimizer, s.optimizer, "optimizer", s, path);
  try {
    H5Writer out(path);
    write_rank_file_contents(out, s, rank, &checked_model, &checked_optimizer);
    out.close();
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove(path, ec);  // a refused or failed save leaves nothing behind
    throw;
  }
}

namespace {

// read_rank_file, or with `tensor_data` false read_rank_file_shapes (resharding.h).
TrainingState read_rank_file_impl(const std::string& path, bool tensor_data) {
  H5Reader in(path);
  if (in.string_attribute("/", "format") != kRankFileFormat) {
    throw CheckpointError(path + ": not a Keel checkpoint rank file (attribute 'format' is not " + kRankFileFormat +
                          ")");
  }
  const int64_t version = in.int_attribute("/", "format_version");
  if (version != kCheckpointFormatVersion) {
    throw CheckpointError(path + ": checkpoint format version " + std::to_string(version) + ", this Keel reads " +
                          std::to_string(kCheckpointFormatVersion));
  }
  TrainingState s;
  s.step = in.int_attribute("/", "step");
  s.tokens_seen = in.int_attribute("/", "tokens_seen");
  if (s.step < 0 || s.tokens_seen < 0) throw CheckpointError(path + ": negative step or tokens_seen");
  s.model = read_named(in, "/model", &s.placement, "model/", tensor_data);
  s.optimizer_name = in.string_attribute("/optimizer", "name");
  s.optimizer_step = in.int_attribute("/optimizer", "step");
  s.optimizer_json = in.exists("/optimizer/state_json") ? in.read_text("/optimizer/state_json") : "";
  s.optimizer = read_named(in, "/optimizer/state", &s.placement, "optimizer/", tensor_data);
  s.lr_schedule = in.read_text("/lr_schedule");
  if (in.exists("/rng/cpu")) s.cpu_rng = from_raw(in.read_tensor("/rng/cpu"));
  if (in.exists("/rng/cuda")) {
    for (size_t i = 0; in.exists("/rng/cuda/" + std::to_string(i)); ++i)
      s.cuda_rng.push_back(from_raw(in.read_tensor("/rng/cuda/" + std::to_string(i))));
  }
  s.data_ledger = in.read_text("/data/ledger");
  s.config_ini = in.read_text("/config");
  s.lineage = in.read_text("/lineage");
  check_state_json(s.optimizer_json, path + ":/optimizer/state_json");
  check_lr_schedule(s.lr_schedule, path + ":/lr_schedule");
  check_ledger(s.data_ledger, path + ":/data/ledger");
  parse_lineage(s.lineage, path + ":/lineage");
  for (const auto& slot : in.groups_under("/plugins")) {
    for (const auto& name : in.groups_under("/plugins/" + slot)) {
      SavedPluginState p;
      const std::string group = "/plugins/" + slot + "/" + name;
      p.slot = slot;
      p.name = in.string_attribute(group, "name");
      p.version = in.string_attribute(group, "version");
      p.json = in.read_text(group + "/state");
      check_state_json(p.json, path + ":" + group + "/state");
      if (in.exists(group + "/tensors")) p.tensors = read_named(in, group + "/tensors");
      s.plugins.push_back(std::move(p));
    }
  }
  return s;
}

}  // namespace

TrainingState read_rank_file(const std::string& path) { return read_rank_file_impl(path, /*tensor_data=*/true); }

TrainingState read_rank_file_shapes(const std::string& path) {
  return read_rank_file_impl(path, /*tensor_data=*/false);
}

// at::Generator is a shared handle: a copy reads and sets the default generator itself.
at::Generator cuda_generator(int64_t device) {
  return at::globalContext().defaultGenerator(
      c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
}

void capture_rng(TrainingState& state) {
  at::Generator cpu = at::detail::getDefaultCPUGenerator();
  state.cpu_rng = cpu.get_state();
  state.cuda_rng.clear();
  if (torch::cuda::is_available()) {
    for (int64_t i = 0; i < static_cast<int64_t>(torch::cuda::device_count()); ++i) {
      state.cuda_rng.push_back(cuda_generator(i).get_state());
    }
  }
}

void restore_rng(const TrainingState& state) {
  try {
    if (state.cpu_rng.defined()) {
      at::Generator cpu = at::detail::getDefaultCPUGenerator();
      cpu.set_state(state.cpu_rng);
    }
    if (torch::cuda::is_available()) {
      const auto devices = static_cast<size_t>(torch::cuda::device_count());
      for (size_t i = 0; i < state.cuda_rng.size() && i < devices; ++i) {
        cuda_generator(static_cast<int64_t>(i)).set_state(state.cuda_rng[i]);
      }
    }
  } catch (const c10::Error& e) {
    throw CheckpointError(std::string("checkpoint RNG state rejected by LibTorch: ") + e.what_without_backtrace());
  }
}

}  // namespace keel::checkpoint
