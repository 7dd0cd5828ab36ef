#pragma once

// One step of the key/value cache of incremental decoding: where a step's new tokens go, what each
// query sees, and the in-place writes. The caller owns the cache; check_arguments has checked it.
#include <ATen/core/Tensor.h>

#include "arguments.h"

namespace torchmha::composite {

// One decoding step over a cache, computed from the lengths before anything is written.
struct CacheStep {
  at::Tensor positions;      // (N, L) int64: query i of entry b sits at cache_lengths[b] + i
  at::Tensor key_positions;  // (N, S) int64: new key j of entry b goes to cache_lengths[b] + j
  at::Tensor new_lengths;    // (N) int64: each entry's length after the step (its real keys)
  at::Tensor mask;           // (N, 1, L, max_seq_len) additive: -inf where a query may not look
};

CacheStep plan_cache_step(const Arguments& args);

// Writes `heads` (N, num_kv_heads, L, head_dim) into `cache` at the step's positions.
void write_into_cache(const at::Tensor& cache, const at::Tensor& heads, const CacheStep& step);

}  // namespace torchmha::composite
