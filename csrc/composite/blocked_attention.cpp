#include "blocked_attention.h"

#include "attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <string>
#include <system_error>
#include <vector>

namespace torchmha::composite {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

// TORCHMHA_SCORE_BLOCK_BYTES, whole or refused: no "12abc" read as 12, no negative read as 1.
// Beyond 1 TiB no block is meant, and four blocks' bytes must still fit in int64.
int64_t parse_score_block_bytes(const char* text) {
  constexpr int64_t kMaxBytes = int64_t{1} << 40;
  const char* end = text + std::strlen(text);
  int64_t bytes = 0;
  const auto [parsed_to, error] = std::from_chars(text, end, bytes);
  TORCH_CHECK_VALUE(error == std::errc() && parsed_to == end && bytes >= 1 && bytes <= kMaxBytes,
                    "torchmha.multi_head_attention: the environment variable "
                    "TORCHMHA_SCORE_BLOCK_BYTES must be a whole number of bytes from 1 to ",
                    kMaxBytes, ", but got \"", text, "\"");
  return bytes;
}

int64_t score_block_bytes() {
  // Tests shrink the blocks to reach many of them with small, gradcheck-sized inputs.
  // A refused value throws out of the initialiser, so every call reports it again.
  static const int64_t bytes = [] {
    const char* configured = std::getenv("TORCHMHA_SCORE_BLOCK_BYTES");
    return configured ? parse_score_block_bytes(configured) : int64_t{2} << 20;
  }();
  return bytes;
}

// Query rows per block such that `heads` heads' (rows, S) scores fill about score_block_bytes().
int64_t rows_filling_a_block(const at::Tensor& query, const at::Tensor& key, int64_t heads) {
  const int64_t row_bytes = heads * key.size(2) * query.element_size();
  return std::clamp<int64_t>(score_block_bytes() / row_bytes, 1, query.size(2));
}

// Rows per block of one head for the threaded loops (the block size that measured fastest:
// scripts/bench/NOTES.md), and every thread gets a block even with one batch entry.
int64_t rows_per_head_block(const at::Tensor& query, const at::Tensor& key) {
  const int64_t blocks_per_entry = ceil_div(at::get_num_threads(), query.size(0));
  return std::min(rows_filling_a_block(query, key, /*heads=*/1),
                  ceil_div(query.size(2), blocks_per_entry));
}

// A broadcastable (N|1, H|1, L|1, S|1) tensor's slice for batch entry n and rows [start, +length).
at::Tensor block_of(const at::Tensor& tensor, int64_t n, int64_t start, int64_t length) {
  auto slice = tensor.select(0, tensor.size(0) == 1 ? 0 : n);
  return slice.size(1) == 1 ? slice : slice.narrow(1, start, length);
}

// The same for one head h: (L|1, S|1) rows.
at::Tensor head_block_of(const at::Tensor& tensor, int64_t n, int64_t h, int64_t start,
                         int64_t length) {
  const auto entry = block_of(tensor, n, start, length);
  return entry.select(0, entry.size(0) == 1 ? 0 : h);
}

// softmax(scale * q k^T + mask) of one block, (H, rows, S), zero on fully masked rows.
at::Tensor block_probabilities(const at::Tensor& query_rows, const at::Tensor& keys_t, double scale,
                               const MaskedRows& masked, int64_t n, int64_t start, int64_t length) {
  const auto mask = masked.mask
                        ? std::optional<at::Tensor>(block_of(*masked.mask, n, start, length))
                        : std::nullopt;
  auto probabilities = scaled_scores(query_rows, keys_t, mask, scale).softmax(-1);
  if (masked.fully_masked_rows) {
    probabilities =
        probabilities.masked_fill(block_of(*masked.fully_masked_rows, n, start, length), 0);
  }
  return probabilities;
}

// One head's block of probabilities, (rows, S), written into `scores`.
void head_probabilities_into(at::Tensor& scores, const at::Tensor& query_rows,
                             const at::Tensor& keys, double scale, const MaskedRows& masked,
                             int64_t n, int64_t h, int64_t start, int64_t length) {
  if (masked.mask) {
    at::addmm_out(scores, head_block_of(*masked.mask, n, h, start, length), query_rows, keys.t(),
                  /*beta=*/1, /*alpha=*/scale);
  } else {
    // beta = 0: the GEMM never reads what the buffer held.
    at::addmm_out(scores, scores, query_rows, keys.t(), /*beta=*/0, /*alpha=*/scale);
  }
  at::_softmax_out(scores, scores, -1, /*half_to_float=*/false);
  if (masked.fully_masked_rows) {
    scores.masked_fill_(head_block_of(*masked.fully_masked_rows, n, h, start, length), 0);
  }
}

// The forward, without autograd. Threads take (batch entry, block of rows) units and walk every
// head in turn with a scores buffer of their own, small enough for the cache: each GEMM and
// softmax runs single-threaded on data at hand, and a unit owns its rows of the averaged weights.
// The output is laid out (N, L, H, Dv), so that the batch-first head merge is a view.
std::tuple<at::Tensor, at::Tensor> forward_blocks(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, const MaskedRows& masked,
                                                  bool average_heads) {
  const int64_t batch = query.size(0);
  const int64_t heads = query.size(1);
  const int64_t target_len = query.size(2);
  const int64_t source_len = key.size(2);
  const int64_t block_rows = rows_per_head_block(query, key);
  const int64_t blocks_per_entry = ceil_div(target_len, block_rows);
  const double scale = softmax_scale(query);
  auto output = at::empty({batch, target_len, heads, value.size(-1)}, query.options());
  auto weights = average_heads ? at::empty({batch, target_len, source_len}, query.options())
                               : at::empty({batch, heads, target_len, source_len}, query.options());
  // The head sum accumulates in the weights themselves in float32/float64, else in float.
  const bool sum_in_weights =
      query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble;
  const at::ThreadLocalState caller_state;  // grad and inference mode for the worker threads
  at::parallel_for(0, batch * blocks_per_entry, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller_state);
    auto scores_buffer = at::empty({block_rows, source_len}, query.options());
    at::Tensor sum_buffer;
    if (average_heads && !sum_in_weights) {
      sum_buffer = at::empty({block_rows, source_len}, query.options().dtype(at::kFloat));
    }
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t n = unit / blocks_per_entry;
      const int64_t start = (unit % blocks_per_entry) * block_rows;
      const int64_t length = std::min(block_rows, target_len - start);
      auto scores = scores_buffer.narrow(0, 0, length);
      auto output_rows = output.select(0, n).narrow(0, start, length);
      at::Tensor head_sum;
      if (average_heads) {
        head_sum = sum_in_weights ? weights.select(0, n).narrow(0, start, length)
                                  : sum_buffer.narrow(0, 0, length);
      }
      for (int64_t h = 0; h < heads; ++h) {
        // Per-head weights are computed in place; averaged ones go through the buffer.
        auto probabilities =
            average_heads ? scores : weights.select(0, n).select(0, h).narrow(0, start, length);
        head_probabilities_into(probabilities,
                                query.select(0, n).select(0, h).narrow(0, start, length),
                                key.select(0, n).select(0, h), scale, masked, n, h, start, length);
        auto output_head = output_rows.select(1, h);
        at::mm_out(output_head, probabilities, value.select(0, n).select(0, h));
        if (average_heads) {
          h == 0 ? head_sum.copy_(probabilities) : head_sum.add_(probabilities);
        }
      }
      if (average_heads) {
        // Summed, then divided: the order of torch.mean.
        head_sum.div_(heads);
        if (!sum_in_weights) {
          weights.select(0, n).narrow(0, start, length).copy_(head_sum);
        }
      }
    }
  });
  return {output.permute({0, 2, 1, 3}), weights};
}

// The backward without recording (no create_graph). Threads take (batch entry, head) units, so a
// unit owns its head's key and value gradients; each block of probabilities is recomputed into a
// buffer of the thread's own. Returns the gradients of query, key and value.
std::array<at::Tensor, 3> backward_blocks(const at::Tensor& query, const at::Tensor& key,
                                          const at::Tensor& value, const MaskedRows& masked,
                                          bool average_heads, const at::Tensor& grad_output,
                                          const at::Tensor& grad_weights) {
  const int64_t batch = query.size(0);
  const int64_t heads = query.size(1);
  const int64_t target_len = query.size(2);
  const int64_t source_len = key.size(2);
  const int64_t block_rows = rows_filling_a_block(query, key, /*heads=*/1);
  const double scale = softmax_scale(query);
  auto grad_query = at::empty(query.sizes(), query.options());
  auto grad_key = at::empty(key.sizes(), key.options());
  auto grad_value = at::empty(value.sizes(), value.options());
  const at::ThreadLocalState caller_state;  // grad mode off for the worker threads, too
  at::parallel_for(0, batch * heads, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller_state);
    const auto buffer_options = query.options();
    auto probabilities_buffer = at::empty({block_rows, source_len}, buffer_options);
    auto grad_probabilities_buffer = at::empty({block_rows, source_len}, buffer_options);
    auto grad_scores_buffer = at::empty({block_rows, source_len}, buffer_options);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t n = unit / heads;
      const int64_t h = unit % heads;
      const auto queries = query.select(0, n).select(0, h);  // (L, D)
      const auto keys = key.select(0, n).select(0, h);       // (S, D)
      const auto values = value.select(0, n).select(0, h);   // (S, Dv)
      auto grad_keys = grad_key.select(0, n).select(0, h);
      auto grad_values = grad_value.select(0, n).select(0, h);
      if (!grad_output.defined()) {
        grad_values.zero_();
      }
      for (int64_t start = 0; start < target_len; start += block_rows) {
        const int64_t length = std::min(block_rows, target_len - start);
        const double accumulated = start == 0 ? 0.0 : 1.0;  // beta: 0 overwrites the garbage
        const auto query_rows = queries.narrow(0, start, length);
        auto probabilities = probabilities_buffer.narrow(0, 0, length);
        auto grad_probabilities = grad_probabilities_buffer.narrow(0, 0, length);
        auto grad_scores = grad_scores_buffer.narrow(0, 0, length);
        head_probabilities_into(probabilities, query_rows, keys, scale, masked, n, h, start,
                                length);
        // d loss / d probabilities, from the output (P V) and from the returned weights.
        if (grad_output.defined()) {
          const auto grad_output_rows =
              grad_output.select(0, n).select(0, h).narrow(0, start, length);
          at::mm_out(grad_probabilities, grad_output_rows, values.t());
          at::addmm_out(grad_values, grad_values, probabilities.t(), grad_output_rows,
                        /*beta=*/accumulated);
        }
        if (grad_weights.defined()) {
          const auto rows = average_heads
                                ? grad_weights.select(0, n).narrow(0, start, length)
                                : grad_weights.select(0, n).select(0, h).narrow(0, start, length);
          if (grad_output.defined()) {
            grad_probabilities.add_(rows, average_heads ? 1.0 / static_cast<double>(heads) : 1.0);
          } else {
            grad_probabilities.copy_(rows);
            if (average_heads) {
              grad_probabilities.div_(heads);  // in float, as the mean's own backward
            }
          }
        }
        // P * (dP - rowsum(P * dP)); fully masked rows have P = 0, so 0.
        at::_softmax_backward_data_out(grad_scores, grad_probabilities, probabilities, -1,
                                       probabilities.scalar_type());
        auto grad_query_rows = grad_query.select(0, n).select(0, h).narrow(0, start, length);
        at::addmm_out(grad_query_rows, grad_query_rows, grad_scores, keys, /*beta=*/0,
                      /*alpha=*/scale);
        at::addmm_out(grad_keys, grad_keys, grad_scores.t(), query_rows, /*beta=*/accumulated,
                      /*alpha=*/scale);
      }
    }
  });
  return {grad_query, grad_key, grad_value};
}

// Accumulates a (H, S, D) gradient out of place, so every step stays differentiable.
void accumulate(std::optional<at::Tensor>& total, const at::Tensor& left, const at::Tensor& right) {
  total = total ? at::baddbmm(*total, left, right) : at::matmul(left, right);
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
    if (!at::GradMode::is_enabled()) {
      auto [grad_query, grad_key, grad_value] =
          backward_blocks(query, key, value, masked, average_heads, grad_output, grad_weights);
      return {grad_query, grad_key, grad_value, at::Tensor(), at::Tensor()};
    }
    // Recorded (create_graph): ATen ops on blocks of every head, so the backward has a backward.
    const double scale = softmax_scale(query);
    const int64_t heads = query.size(1);
    const int64_t target_len = query.size(2);
    const int64_t block_rows = rows_filling_a_block(query, key, heads);

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
            block_probabilities(query_rows, keys_t, scale, masked, n, start, length);
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

bool scores_outgrow_a_block(int64_t score_elements, int64_t element_size) {
  // Four blocks (8 MiB by default): below that the unblocked path's fewer calls win.
  return score_elements * element_size > 4 * score_block_bytes();
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
