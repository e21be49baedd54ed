// Why: the regular-file checks moved to core/io/regular_file.h (file access is core/io's job); these names keep the
// data, interop and eval sources that still say data::non_regular_error compiling until they include io directly.
#pragma once

#include "core/io/regular_file.h"

namespace keel::data {
using io::non_regular_error;
using io::non_regular_kind;
using io::open_regular_file;
using io::read_regular_file;
using io::require_regular_file;
}  // namespace keel::data
