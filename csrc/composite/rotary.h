#pragma once

// Rotary position embeddings (RoPE) on split heads: pairs of features rotate by an angle that grows
// with the token's position, so that query-key scores depend on relative positions.
#include <ATen/core/Tensor.h>

#include <optional>

#include "arguments.h"

namespace torchmha::composite {

// cos and sin of every position's angles, each (N or 1, 1, length, rotary_dim / 2): computed once
// per call and shared by the queries and keys that have the same positions.
struct RotaryTables {
  at::Tensor cos, sin;
};

// The tables for `positions` (L) or (N, L), or for 0 .. length - 1 when none are given. They are
// computed in float64 for float64 heads, else in float32, and cast to `dtype`.
RotaryTables rotary_tables(const Arguments& args, const std::optional<at::Tensor>& positions,
                           const c10::SymInt& length, at::ScalarType dtype);

// `heads` (N, H, length, head_dim) with its leading rotary_dim features rotated.
at::Tensor rotate(const at::Tensor& heads, const RotaryTables& tables, const Arguments& args);

}  // namespace torchmha::composite
