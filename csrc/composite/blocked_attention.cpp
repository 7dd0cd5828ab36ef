#include "blocked_attention.h"

#include "attention.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

namespace torchmha::composite {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t score_block_bytes() {
  // Tests shrink the blocks to reach many of them with small, gradcheck-sized inputs.
  static const int64_t bytes = [] {
    const char* configured = std::getenv("TORCHMHA_SCORE_BLOCK_BYTES");
    return configured ? std::max<int64_t>(1, std::stoll(configured)) : int64_t{8} << 20;
  }();
  return bytes;
}

// Query rows per block: one block of (H, rows, S) scores fills about score_block_bytes().
int64_t rows_per_block(const at::Tensor& query, const at::Tensor& key) {
  const int64_t row_bytes = query.size(1) * key.size(2) * query.element_size();
  return std::clamp<int64_t>(score_block_bytes() / row_bytes, 1, query.size(2));
}

// A broadcastable (N|1, H|1, L|1, S|1) tensor's slice for batch entry n and rows [start, +length).
at::Tensor block_of(const at::Tensor& tensor, int64_t n, int64_t start, int64_t length) {
  auto slice = tensor.select(0, tensor.size(0) == 1 ? 0 : n);
  return slice.size(1) == 1 ? slice : slice.narrow(1, start, length);
}

// softmax(scale * q k^T + mask) of one block, (H, rows, S), zero on fully masked rows.
at::Tensor block_probabilities(const at::Tensor& query_rows, const at::Tensor& keys_t, double scale,
                               const MaskedRows& masked, int64_t n, int64_t start, int64_t length,
                               bool in_place) {
  const auto mask = masked.mask
                        ? std::optional<at::Tensor>(block_of(*masked.mask, n, start, length))
                        : std::nullopt;
  auto scores = scaled_scores(query_rows, keys_t, mask, scale);
  auto probabilities =
      in_place ? at::_softmax_out(scores, scores, -1, /*half_to_float=*/false) : scores.softmax(-1);
  if (masked.fully_masked_rows) {
    const auto rows = block_of(*masked.fully_masked_rows, n, start, length);
    probabilities =
        in_place ? probabilities.masked_fill_(rows, 0) : probabilities.masked_fill(rows, 0);
  }
  return probabilities;
}

// Writes the head mean of a block's (H, rows, S) probabilities into its (rows, S) weight rows.
void average_heads_into(at::Tensor weight_rows, const at::Tensor& probabilities,
                        const at::Tensor& head_weights) {
  if (head_weights.defined()) {
    // One (1, H) x (H, rows * S) GEMM reads the probabilities once and writes the mean in place.
    auto flat_rows = weight_rows.view({1, -1});
    at::mm_out(flat_rows, head_weights, probabilities.view({head_weights.size(1), -1}));
  } else {
    at::mean_out(weight_rows, probabilities, {0});
  }
}

// The forward, without autograd: each block's output and weights written straight into place.
// The output is laid out (N, L, H, Dv), so that the batch-first head merge is a view.
std::tuple<at::Tensor, at::Tensor> forward_blocks(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, const MaskedRows& masked,
                                                  bool average_heads) {
  const int64_t batch = query.size(0);
  const int64_t heads = query.size(1);
  const int64_t target_len = query.size(2);
  const int64_t source_len = key.size(2);
  const int64_t block_rows = rows_per_block(query, key);
  const double scale = softmax_scale(query);
  auto output = at::empty({batch, target_len, heads, value.size(-1)}, query.options());
  auto weights = average_heads ? at::empty({batch, target_len, source_len}, query.options())
                               : at::empty({batch, heads, target_len, source_len}, query.options());
  // In float32 and float64 the head mean is a GEMM with 1/H weights; other dtypes keep mean's
  // float accumulation.
  const bool mean_by_gemm =
      average_heads && (query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble);
  const auto head_weights =
      mean_by_gemm ? at::full({1, heads}, 1.0 / static_cast<double>(heads), query.options())
                   : at::Tensor();
  for (int64_t n = 0; n < batch; ++n) {
    const auto keys_t = key.select(0, n).transpose(-2, -1).contiguous();  // (H, D, S)
    const auto values = value.select(0, n).contiguous();                  // (H, S, Dv)
    for (int64_t start = 0; start < target_len; start += block_rows) {
      const int64_t length = std::min(block_rows, target_len - start);
      const auto probabilities =
          block_probabilities(query.select(0, n).narrow(1, start, length), keys_t, scale, masked, n,
                              start, length, /*in_place=*/true);
      auto output_rows = output.select(0, n).narrow(0, start, length).transpose(0, 1);
      at::bmm_out(output_rows, probabilities, values);
      if (average_heads) {
        average_heads_into(weights.select(0, n).narrow(0, start, length), probabilities,
                           head_weights);
      } else {
        weights.select(0, n).narrow(1, start, length).copy_(probabilities);
      }
    }
  }
  return {output.permute({0, 2, 1, 3}), weights};
}

// Accumulates a (H, S, D) gradient: in place in a plain backward, out of place when the backward
// itself is recorded (create_graph), so every step stays differentiable.
void accumulate(std::optional<at::Tensor>& total, const at::Tensor& left, const at::Tensor& right) {
  if (!total) {
    total = at::matmul(left, right);
  } else if (at::GradMode::is_enabled()) {
    total = at::baddbmm(*total, left, right);
  } else {
    total->baddbmm_(left, right);
  }
}

struct BlockedAttention : public torch::autograd::Function<BlockedAttention> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const MaskedRows& masked,
                               bool average_heads) {
    ctx->save_for_backward({query, key, value});
    ctx->saved_data["mask"] = masked.mask ? c10::IValue(*masked.mask) : c10::IValue();
    ctx->saved_data["rows"] =
        masked.fully_masked_rows ? c10::IValue(*masked.fully_masked_rows) : c10::IValue();
    ctx->saved_data["average_heads"] = average_heads;
    ctx->set_materialize_grads(false);
    auto [output, weights] = forward_blocks(query, key, value, masked, average_heads);
    return {output, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &query = saved[0], &key = saved[1], &value = saved[2];
    MaskedRows masked;
    if (!ctx->saved_data["mask"].isNone()) masked.mask = ctx->saved_data["mask"].toTensor();
    if (!ctx->saved_data["rows"].isNone()) {
      masked.fully_masked_rows = ctx->saved_data["rows"].toTensor();
    }
    const bool average_heads = ctx->saved_data["average_heads"].toBool();
    const at::Tensor& grad_output = grads[0];   // (N, H, L, Dv) or undefined
    const at::Tensor& grad_weights = grads[1];  // (N, L, S), (N, H, L, S) or undefined
    if (!grad_output.defined() && !grad_weights.defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const double scale = softmax_scale(query);
    const int64_t heads = query.size(1);
    const int64_t target_len = query.size(2);
    const int64_t block_rows = rows_per_block(query, key);
    const bool in_place = !at::GradMode::is_enabled();

    std::vector<at::Tensor> grad_query, grad_key, grad_value;
    for (int64_t n = 0; n < query.size(0); ++n) {
      // Contiguous once per batch entry, not copied again by every block's matmul.
      const auto keys = key.select(0, n).contiguous();  // (H, S, D)
      const auto keys_t = keys.transpose(-2, -1);
      const auto values_t = value.select(0, n).contiguous().transpose(-2, -1);  // (H, Dv, S)
      std::vector<at::Tensor> grad_query_blocks;
      std::optional<at::Tensor> grad_keys, grad_values;
      for (int64_t start = 0; start < target_len; start += block_rows) {
        const int64_t length = std::min(block_rows, target_len - start);
        const auto query_rows = query.select(0, n).narrow(1, start, length);
        const auto probabilities =
            block_probabilities(query_rows, keys_t, scale, masked, n, start, length, in_place);
        // d loss / d probabilities, from the output (P V) and from the returned weights.
        at::Tensor grad_probabilities;
        at::Tensor grad_output_rows;
        if (grad_output.defined()) {
          grad_output_rows = grad_output.select(0, n).narrow(1, start, length);
          grad_probabilities = at::matmul(grad_output_rows, values_t);
          accumulate(grad_values, probabilities.transpose(-2, -1), grad_output_rows);
        }
        if (grad_weights.defined()) {
          const auto rows = average_heads
                                ? grad_weights.select(0, n).narrow(0, start, length) / heads
                                : grad_weights.select(0, n).narrow(1, start, length);
          grad_probabilities = grad_probabilities.defined()
                                   ? grad_probabilities + rows
                                   : rows.expand_as(probabilities).contiguous();
        }
        // Softmax backward, P * (dP - rowsum(P * dP)), in one fused pass (differentiable, too);
        // fully masked rows have P = 0, so 0.
        const auto grad_scores = at::_softmax_backward_data(grad_probabilities, probabilities, -1,
                                                            probabilities.scalar_type());
        grad_query_blocks.push_back(at::matmul(grad_scores, keys) * scale);
        accumulate(grad_keys, grad_scores.transpose(-2, -1), query_rows);
      }
      grad_query.push_back(at::cat(grad_query_blocks, 1));
      grad_key.push_back(*grad_keys * scale);
      grad_value.push_back(grad_values ? *grad_values : at::zeros_like(value.select(0, n)));
    }
    return {at::stack(grad_query), at::stack(grad_key), at::stack(grad_value), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

bool scores_outgrow_a_block(const at::Tensor& query, const at::Tensor& key) {
  return query.size(0) * query.size(1) * query.size(2) * key.size(2) * query.element_size() >
         score_block_bytes();
}

std::tuple<at::Tensor, at::Tensor> blocked_attention_with_weights(const at::Tensor& query,
                                                                  const at::Tensor& key,
                                                                  const at::Tensor& value,
                                                                  const MaskedRows& masked,
                                                                  bool average_heads) {
  const auto results = BlockedAttention::apply(query, key, value, masked, average_heads);
  return {results[0], results[1]};
}

}  // namespace torchmha::composite
