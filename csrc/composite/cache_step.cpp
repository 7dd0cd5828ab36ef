#include "cache_step.h"

#include <ATen/ATen.h>

#include "attention.h"

#include <limits>
#include <utility>

namespace torchmha::composite {

CacheStep plan_cache_step(const Arguments& args) {
  const auto& lengths = *args.cache_lengths;
  const c10::SymInt target_len = args.query.sym_size(args.sequence_dim());
  const c10::SymInt source_len = args.key.sym_size(args.sequence_dim());
  const c10::SymInt max_seq_len = args.cache_key->sym_size(2);
  auto positions = lengths.unsqueeze(1) + at::arange(c10::Scalar(target_len), lengths.options());
  // The checks made causal and rotary steps self-attention, where keys sit at the queries' places.
  auto key_positions =
      lengths.unsqueeze(1) + at::arange(c10::Scalar(source_len), lengths.options());
  at::Tensor new_lengths;
  if (given(args.key_padding_mask)) {
    // Right padding: an entry advances by its real (unmasked) tokens only.
    const auto padding =
        args.is_batched() ? *args.key_padding_mask : args.key_padding_mask->unsqueeze(0);
    new_lengths = lengths + padding.logical_not().sum(-1);
  } else {
    new_lengths = lengths + c10::Scalar(source_len);
  }
  const auto slots = at::arange(c10::Scalar(max_seq_len), lengths.options()).view({1, 1, 1, -1});
  // Every query sees its entry's cached and real new positions; causal ones up to their own.
  auto visible = slots < new_lengths.view({-1, 1, 1, 1});
  if (args.is_causal) {
    visible = visible.logical_and(slots <= positions.unsqueeze(1).unsqueeze(-1));
  }
  auto mask = at::zeros_like(visible, args.query.options())
                  .masked_fill_(visible.logical_not(), -std::numeric_limits<double>::infinity());
  return {std::move(positions), std::move(key_positions), std::move(new_lengths), std::move(mask)};
}

bool attends_few_over_cache(const Arguments& args, double dropout_p) {
  const auto target_len = args.query.sym_size(args.sequence_dim()).maybe_as_int();
  return !args.need_weights && dropout_p == 0.0 && target_len.has_value() &&
         *target_len <= kFewNewTokens;
}

at::Tensor attend_few_over_cache(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& mask) {
  const auto batch = query.sym_size(0);
  const auto heads = query.sym_size(1);
  const auto target_len = query.sym_size(2);
  const auto head_dim = query.sym_size(3);
  const auto kv_heads = key.sym_size(1);
  const auto slots = key.sym_size(2);
  const auto group = heads / kv_heads;
  // Query head h = kv * group + j: its rows of head kv's GEMM are j * L .. j * L + L - 1.
  const auto grouped_query = (query * softmax_scale(query))
                                 .reshape_symint({batch, kv_heads, group * target_len, head_dim});
  // Scores laid out (slots, queries): the cache is the GEMMs' untransposed operand, which
  // compiled code then reads in place too.
  auto scores = at::matmul(key, grouped_query.transpose(-2, -1))
                    .view_symint({batch, kv_heads, slots, group, target_len});
  scores.add_(mask.squeeze(1).transpose(-2, -1).view_symint({batch, 1, slots, 1, target_len}));
  // Reduced precision normalises in float32, as SDPA's kernels do.
  const bool reduced = c10::isReducedFloatingType(query.scalar_type());
  at::Tensor probabilities;
  if (reduced) {
    probabilities = at::_safe_softmax(scores, 2, at::kFloat).to(query.scalar_type());
  } else {
    at::_softmax_out(scores, scores, 2, /*half_to_float=*/false);
    // A query that sees no slot (padding of an empty entry) attends to nothing, as elsewhere.
    const auto sees_nothing = mask.isneginf().all(-1).view_symint({batch, 1, 1, 1, target_len});
    probabilities = scores.masked_fill_(sees_nothing, 0.0);
  }
  return at::matmul(probabilities.view_symint({batch, kv_heads, slots, group * target_len})
                        .transpose(-2, -1),
                    value)
      .view_symint({batch, heads, target_len, head_dim});
}

void write_into_cache(const at::Tensor& cache, const at::Tensor& heads, const CacheStep& step) {
  // Under autocast the projections come in lower precision; the cache keeps its own dtype.
  const auto source = heads.to(cache.scalar_type());
  const auto sizes = heads.sym_sizes();
  if (cache.is_contiguous()) {
    // The cache as rows (N * KV * max_seq_len, head_dim): index_copy_ of rows stays in place under
    // torch.compile, where scatter_ becomes a copy of the whole cache.
    const auto slots = cache.sym_size(2);
    const auto first_rows =
        at::arange(c10::Scalar(sizes[0] * sizes[1]), step.key_positions.options())
            .view_symint({sizes[0], sizes[1], 1})
            .mul(c10::Scalar(slots));
    const auto rows = first_rows.add(step.key_positions.unsqueeze(1)).reshape({-1});
    cache.view_symint({-1, sizes[3]}).index_copy_(0, rows, source.reshape_symint({-1, sizes[3]}));
    return;
  }
  const auto index = step.key_positions.unsqueeze(1).unsqueeze(-1).expand_symint(
      {sizes[0], sizes[1], sizes[2], sizes[3]});
  cache.scatter_(2, index, source);
}

}  // namespace torchmha::composite
