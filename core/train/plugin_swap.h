// Why: a plugin swap asked for by `keel control` happens between steps, on every rank at the same boundary:
// rank 0 reads the pending requests (core/train/control.h) and sends them to all; each rank loads the new
// plugin (refused on every rank if on any), a checkpoint is saved, the plugin replaces the old one (a new
// optimizer adopts the old one's state by name), and the change is recorded as an event and in the lineage.
#pragma once

#include "core/train/trainer_state.h"

namespace keel::train {

void apply_control_requests(TrainerState& s);

}  // namespace keel::train
