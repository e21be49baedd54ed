// Why: see heartbeat.h. (Minimal version: no diagnosis yet.)
#include "core/parallel/heartbeat.h"

namespace keel::parallel {

std::shared_ptr<FaultMonitor> start_heartbeat_monitor(const c10::intrusive_ptr<::c10d::Store>&, int64_t,
                                                      const Layout&, std::chrono::milliseconds) {
  return nullptr;
}

}  // namespace keel::parallel
