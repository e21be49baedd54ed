// Why: see plugin_swap.h.
#include "core/train/plugin_swap.h"

#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include "core/train/checkpointer.h"
#include "core/train/control.h"
#include "core/train/plugin_continuity.h"

namespace keel::train {

void apply_control_requests(TrainerState& s) {
  // Rank 0 reads the pending requests (control.h) and sends them to every rank, so that all ranks apply the same
  // swaps at the same step boundary; only rank 0 answers the request files and writes events.
  nlohmann::json requests = nlohmann::json::array();
  if (s.rank0()) {
    for (const auto& pending : read_pending_requests(s.paths.control_dir()))
      requests.push_back({{"path", pending.path}, {"text", pending.text}});
  }
  if (!s.groups.world->single()) requests = nlohmann::json::parse(s.groups.world->broadcast_string(requests.dump(), 0));
  for (const auto& item : requests) {
    const std::string path = item.at("path").get<std::string>();
    const int64_t step = s.loader->step();
    std::string outcome;
    try {
      const SwapRequest request = parse_swap_request(item.at("text").get<std::string>());
      if (request.at_step > step) continue;  // not yet: stays pending
      if (request.at_step >= 0 && request.at_step < step)
        throw std::runtime_error("requested for step " + std::to_string(request.at_step) +
                                 ", but the run is already at step " + std::to_string(step));
      const std::string& slot = request.slot;
      plugin_host::parse_slot(slot);
      Config next = s.config;
      for (const auto& override_text : request.overrides()) apply_override(next, override_text, path);
      std::vector<plugin_host::LoadedPlugin> loaded;
      std::string load_error;
      try {
        loaded = plugin_host::PluginHost::load_slot(slot, next);  // may refuse
        refuse_changed_libraries(s, loaded, step);                // a rebuilt file under a path loaded before
      } catch (const std::exception& e) {
        load_error = e.what();
      }
      s.agree_or_throw(load_error, "loading " + slot);  // refused on every rank if on any
      save_checkpoint(s, "before swapping " + slot);
      std::string was;
      for (auto* p : s.plugins->all()) {
        if (p->slot == slot) was += (was.empty() ? "" : ",") + p->name();
      }
      std::vector<std::string> lines;
      if (slot == "optimizer") {
        torch::NoGradGuard no_grad;
        loaded.front().object->bind(s.optimizer_params);
        lines = loaded.front().object->adopt_state(s.plugins->optimizer().object->save_state().tensors);
      }
      // The new plugin has no saved state: it gets this run's history (then its parent's) before it replaces the
      // old one, so that a warm start that fails leaves the run with the plugins it had.
      std::vector<plugin_host::LoadedPlugin*> fresh;
      for (auto& p : loaded) {
        if (slot != "optimizer") fresh.push_back(&p);
      }
      warm_start_plugins(s, fresh, step, s.paths.metrics_h5());
      record_swap(s, slot, loaded, step);
      s.plugins->replace(slot, std::move(loaded));
      s.config = next;
      std::string now;
      for (auto* p : s.plugins->all()) {
        if (p->slot == slot) now += (now.empty() ? "" : ",") + p->name();
      }
      outcome = "step " + std::to_string(step) + ": " + slot + " " + (was.empty() ? "(none)" : was) + " -> " +
                (now.empty() ? "(none)" : now) + " (keel control)";
      for (const auto& l : lines) outcome += "; " + l;
      s.event(step, "plugin_swap", outcome);
      s.lineage.notes.push_back("plugin swap at " + outcome);
      s.write_lineage();
      spdlog::info("plugin swap: {}", outcome);
      if (s.rank0()) mark_request_done(path);
    } catch (const parallel::DistributedError&) {
      throw;
    } catch (const std::exception& e) {
      outcome = e.what();
      s.event(step, "plugin_swap_refused", outcome);
      spdlog::error("swap request {} refused; the run keeps its plugins: {}", path, outcome);
      if (s.rank0()) mark_request_refused(path, outcome);
    }
  }
}

}  // namespace keel::train
