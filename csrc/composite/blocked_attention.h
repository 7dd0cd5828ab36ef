#pragma once

// Attention with weights on the CPU, one head's block of query rows at a time, so the scores
// never exist whole: each thread computes its blocks in a buffer of its own that the cache holds
// (no fresh pages to fault in per call). Shapes as in attention.h.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchmha::composite {

struct MaskedRows {
  std::optional<at::Tensor> mask;               // additive, finite wherever a row was all masked
  std::optional<at::Tensor> fully_masked_rows;  // (.., L, 1), true where every key is masked
};

// True when (N, H, L, S) scores of that many elements outgrow four blocks of one head's scores
// (TORCHMHA_SCORE_BLOCK_BYTES, default 2 MiB), the size from which blocks pay off.
bool scores_outgrow_a_block(int64_t score_elements, int64_t element_size);

// The output (N, H, L, Dv) and weights ((N, L, S) averaged over heads, or (N, H, L, S)).
// Differentiable in query, key and value (to any order: the backward is made of ATen ops and
// recomputes each block's probabilities instead of keeping them); the mask must not need grad.
std::tuple<at::Tensor, at::Tensor> blocked_attention_with_weights(const at::Tensor& query,
                                                                  const at::Tensor& key,
                                                                  const at::Tensor& value,
                                                                  const MaskedRows& masked,
                                                                  bool average_heads);

}  // namespace torchmha::composite
