#include "attention.h"

#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>

namespace torchmha::composite {
namespace {

// Bytes of scores one block of the CPU weights path holds: small enough for the allocator to
// reuse (no fresh pages to fault in every call), large enough for efficient GEMMs.
constexpr int64_t kScoreBlockBytes = 4 << 20;

struct RowFix {
  std::optional<at::Tensor> mask;               // finite wherever a whole row was masked
  std::optional<at::Tensor> fully_masked_rows;  // (.., L, 1), true where every key is masked
};

// Rows with every key masked would give NaN; their mask row becomes zero, and the result row is
// zeroed afterwards. Computed on the mask, which is much smaller than the scores.
RowFix fix_fully_masked_rows(std::optional<at::Tensor> mask) {
  if (!mask) {
    return {};
  }
  auto rows = mask->isneginf().all(-1, /*keepdim=*/true);
  return {mask->masked_fill(rows, 0), rows};
}

bool needs_autograd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const std::optional<at::Tensor>& mask) {
  return at::GradMode::is_enabled() && (query.requires_grad() || key.requires_grad() ||
                                        value.requires_grad() || (mask && mask->requires_grad()));
}

// A real tensor with concrete sizes: not traced (fake, functional or symbolic), so its data may
// be updated in place and loops over its sizes are loops, not graph unrolling.
bool is_concrete(const at::Tensor& tensor) {
  const auto* impl = tensor.unsafeGetTensorImpl();
  return !impl->is_python_dispatch() && !impl->has_symbolic_sizes_strides() &&
         !at::functionalization::impl::isFunctionalTensor(tensor);
}

double softmax_scale(const at::Tensor& query) {
  const int64_t head_dim = query.sym_size(-1).guard_int(__FILE__, __LINE__);
  return 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// (.., L, S)-broadcastable tensor -> its slice for batch entry n and query rows [start, start+len).
at::Tensor block_of(const at::Tensor& tensor, int64_t n, int64_t start, int64_t length) {
  auto slice = tensor.select(0, tensor.size(0) == 1 ? 0 : n);  // (H or 1, L or 1, S or 1)
  return slice.size(1) == 1 ? slice : slice.narrow(1, start, length);
}

// Inference on the CPU: scores in blocks of query rows per batch entry, each block's softmax
// done in place and its share of the output and weights written straight to their place.
std::tuple<at::Tensor, at::Tensor> blocked_attention_with_weights(const at::Tensor& query,
                                                                  const at::Tensor& key,
                                                                  const at::Tensor& value,
                                                                  const RowFix& fix,
                                                                  bool average_heads) {
  const int64_t batch = query.size(0);
  const int64_t heads = query.size(1);
  const int64_t target_len = query.size(2);
  const int64_t source_len = key.size(2);
  const int64_t rows_per_block = std::clamp<int64_t>(
      kScoreBlockBytes / (heads * source_len * query.element_size()), 1, target_len);

  auto output = at::empty({batch, heads, target_len, value.size(-1)}, query.options());
  auto weights = average_heads ? at::empty({batch, target_len, source_len}, query.options())
                               : at::empty({batch, heads, target_len, source_len}, query.options());
  const auto scaled_query = query * softmax_scale(query);
  for (int64_t n = 0; n < batch; ++n) {
    const auto keys_t = key.select(0, n).transpose(-2, -1).contiguous();  // (H, D, S)
    const auto values = value.select(0, n).contiguous();                  // (H, S, Dv)
    for (int64_t start = 0; start < target_len; start += rows_per_block) {
      const int64_t length = std::min(rows_per_block, target_len - start);
      auto scores = at::matmul(scaled_query.select(0, n).narrow(1, start, length), keys_t);
      if (fix.mask) {
        scores.add_(block_of(*fix.mask, n, start, length));
      }
      at::_softmax_out(scores, scores, -1, /*half_to_float=*/false);
      if (fix.fully_masked_rows) {
        scores.masked_fill_(block_of(*fix.fully_masked_rows, n, start, length), 0);
      }
      output.select(0, n).narrow(1, start, length).copy_(at::matmul(scores, values));
      if (average_heads) {
        auto target = weights.select(0, n).narrow(0, start, length);
        at::mean_out(target, scores, {0});
      } else {
        weights.select(0, n).narrow(1, start, length).copy_(scores);
      }
    }
  }
  return {output, weights};
}

at::Tensor sdpa(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                const RowFix& fix, double dropout_p, bool is_causal) {
  auto output = at::scaled_dot_product_attention(query, key, value, fix.mask, dropout_p, is_causal);
  return fix.fully_masked_rows ? output.masked_fill(*fix.fully_masked_rows, 0) : output;
}

}  // namespace

at::Tensor fused_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           std::optional<at::Tensor> mask, double dropout_p, bool is_causal) {
  return sdpa(query, key, value, fix_fully_masked_rows(std::move(mask)), dropout_p, is_causal);
}

std::tuple<at::Tensor, at::Tensor> attention_with_weights(const at::Tensor& query,
                                                          const at::Tensor& key,
                                                          const at::Tensor& value,
                                                          std::optional<at::Tensor> mask,
                                                          double dropout_p, bool average_heads) {
  const bool differentiable = needs_autograd(query, key, value, mask);
  const bool concrete = is_concrete(query) && is_concrete(key) && is_concrete(value);
  const RowFix fix = fix_fully_masked_rows(std::move(mask));

  // Blocks pay off once the scores outgrow one block; below that they only add calls. (Sizes
  // are read only when concrete.)
  if (!differentiable && concrete && dropout_p == 0.0 && query.device().is_cpu() &&
      query.size(0) * query.size(1) * query.size(2) * key.size(2) * query.element_size() >
          kScoreBlockBytes) {
    return blocked_attention_with_weights(query, key, value, fix, average_heads);
  }

  auto scores = at::matmul(query * softmax_scale(query), key.transpose(-2, -1));
  // Without autograd nothing keeps the scores, so each step may overwrite them.
  const bool in_place = !differentiable && concrete;
  if (fix.mask) {
    scores = in_place ? scores.add_(*fix.mask) : scores + *fix.mask;
  }
  auto probabilities =
      in_place ? at::_softmax_out(scores, scores, -1, false) : at::softmax(scores, -1);
  if (fix.fully_masked_rows) {
    probabilities = in_place ? probabilities.masked_fill_(*fix.fully_masked_rows, 0)
                             : probabilities.masked_fill(*fix.fully_masked_rows, 0);
  }
  if (dropout_p > 0.0) {
    probabilities = at::dropout(probabilities, dropout_p, /*train=*/true);
  }
  auto weights = average_heads ? probabilities.mean(1) : probabilities;
  return {at::matmul(probabilities, value), weights};
}

}  // namespace torchmha::composite
