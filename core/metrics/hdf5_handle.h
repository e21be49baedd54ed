// Why: transitional. HDF5 access moved to core/io/hdf5.h (namespace keel::io) and the metrics row types to
// core/metrics/hdf5_records.h; this keeps files still being edited elsewhere building until their next commit
// names those headers. Delete it when nothing includes it (git grep hdf5_handle.h).
#pragma once

#include "core/io/hdf5.h"
#include "core/metrics/hdf5_records.h"

namespace keel::metrics::detail {
using namespace keel::io;  // NOLINT: the old spelling metrics::detail::X for the moved helpers
}  // namespace keel::metrics::detail
