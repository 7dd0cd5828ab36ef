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

// Up to this many new tokens attend over a cache through `attend_few_over_cache`.
constexpr int64_t kFewNewTokens = 16;

// Whether a step's attention goes through `attend_few_over_cache`: no weights, no dropout, and a
// query length known (not symbolic) to be at most kFewNewTokens.
bool attends_few_over_cache(const Arguments& args, double dropout_p);

// query (N, H, L, D) over a whole cache key/value (N, KV, S, D), H a multiple of KV, `mask`
// additive (N, 1, L, S): one batched GEMM per key/value head with its group's queries as rows, so
// each cached key and value is read once (SDPA's CPU kernel reads them once per query head, and
// elsewhere they would be repeated). A query that sees no slot attends to nothing (zeros).
at::Tensor attend_few_over_cache(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& mask);

// Writes `heads` (N, num_kv_heads, L, head_dim) into `cache` at the step's positions.
void write_into_cache(const at::Tensor& cache, const at::Tensor& heads, const CacheStep& step);

}  // namespace torchmha::composite
