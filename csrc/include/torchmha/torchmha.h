#pragma once

// Umbrella header for C++ users of torchmha.
#include <torchmha/export.h>
#include <torchmha/kv_cache.h>
#include <torchmha/module.h>
#include <torchmha/ops.h>
#include <torchmha/options.h>
#include <torchmha/serialize.h>
#include <torchmha/textbook.h>

namespace torchmha {

/// The library version, "major.minor.patch".
TORCHMHA_API const char* version();

namespace detail {
// Referencing a symbol of libtorchmha keeps the linker from dropping the library (and with it
// the op registration) from a program that includes this header, even under --as-needed.
__attribute__((weak)) const char* (*link_anchor)() = &version;
}  // namespace detail

}  // namespace torchmha
