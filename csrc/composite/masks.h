#pragma once

// Turns the op's mask arguments into one additive mask for (N, H, L, S) scores.
#include <ATen/core/Tensor.h>

#include <optional>

#include "arguments.h"

namespace torchmha::composite {

// Boolean (L, S) mask, true above the diagonal: query i may attend keys j <= i.
at::Tensor causal_mask(const c10::SymInt& target_len, const c10::SymInt& source_len,
                       const at::TensorOptions& options);

// Additive mask (-inf where attention is not allowed) broadcastable to
// (N, H, L, S + appended_keys), in the dtype of `query`; nullopt when no mask applies.
// `attn_mask` overrides args.attn_mask (so a materialised causal mask can stand in).
std::optional<at::Tensor> merged_additive_mask(const Arguments& args,
                                               const std::optional<at::Tensor>& attn_mask,
                                               int64_t appended_keys);

}  // namespace torchmha::composite
