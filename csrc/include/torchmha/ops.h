#pragma once

#include <ATen/core/Tensor.h>
#include <torch/arg.h>
#include <torchmha/export.h>

#include <optional>
#include <tuple>

namespace torchmha {

/// Multi-head attention, `torch.nn.functional.multi_head_attention_forward`'s
/// semantics, as the one registered op `torchmha::multi_head_attention`.
///
/// This entry point calls the op through the dispatcher, so autograd, autocast
/// and tracing see the same op as Python and TorchScript do. Its arguments,
/// their order and their defaults are the op schema's.
///
/// Inputs are `(L, N, E)` (or `(N, L, E)` with `batch_first`) or unbatched
/// `(L, E)`. Give either `in_proj_weight` `(3E, E)` or all three of
/// `q_proj_weight` `(E, E)`, `k_proj_weight` `(E, kdim)`, `v_proj_weight`
/// `(E, vdim)`. Boolean masks are true where attention is *not* allowed;
/// floating masks are added to the scores. Returns `(output, weights)`;
/// `weights` is an empty tensor when `need_weights` is false.
TORCHMHA_API std::tuple<at::Tensor, at::Tensor> multi_head_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, const at::Tensor& out_proj_weight,
    const std::optional<at::Tensor>& out_proj_bias = std::nullopt,
    const std::optional<at::Tensor>& bias_k = std::nullopt,
    const std::optional<at::Tensor>& bias_v = std::nullopt, bool add_zero_attn = false,
    double dropout_p = 0.0, bool training = true,
    const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
    const std::optional<at::Tensor>& attn_mask = std::nullopt, bool need_weights = true,
    bool average_attn_weights = true, bool is_causal = false, bool batch_first = false);

/// The arguments of `torchmha::multi_head_attention` after `query`, `key`
/// and `value`, by name, with the schema's defaults (as LibTorch's
/// `torch::nn::functional::MultiheadAttentionForwardFuncOptions`).
///
/// Example:
/// ```
/// auto [out, weights] = torchmha::multi_head_attention(
///     x, x, x,
///     torchmha::MultiHeadAttentionFuncOptions(8, out_proj_weight)
///         .in_proj_weight(in_proj_weight)
///         .batch_first(true));
/// ```
struct TORCHMHA_API MultiHeadAttentionFuncOptions {
  MultiHeadAttentionFuncOptions(int64_t num_heads, at::Tensor out_proj_weight);

  /// Number of heads; must divide `embed_dim`.
  TORCH_ARG(int64_t, num_heads);
  /// Output projection `(E, E)`.
  TORCH_ARG(at::Tensor, out_proj_weight);
  /// Packed input projection `(3E, E)`; or give the three separate ones.
  TORCH_ARG(std::optional<at::Tensor>, in_proj_weight) = std::nullopt;
  /// Packed input projection bias `(3E)`.
  TORCH_ARG(std::optional<at::Tensor>, in_proj_bias) = std::nullopt;
  /// Separate query projection `(E, E)`.
  TORCH_ARG(std::optional<at::Tensor>, q_proj_weight) = std::nullopt;
  /// Separate key projection `(E, kdim)`.
  TORCH_ARG(std::optional<at::Tensor>, k_proj_weight) = std::nullopt;
  /// Separate value projection `(E, vdim)`.
  TORCH_ARG(std::optional<at::Tensor>, v_proj_weight) = std::nullopt;
  /// Output projection bias `(E)`.
  TORCH_ARG(std::optional<at::Tensor>, out_proj_bias) = std::nullopt;
  /// Learned bias appended to the keys `(1, 1, E)`; goes with `bias_v`.
  TORCH_ARG(std::optional<at::Tensor>, bias_k) = std::nullopt;
  /// Learned bias appended to the values `(1, 1, E)`; goes with `bias_k`.
  TORCH_ARG(std::optional<at::Tensor>, bias_v) = std::nullopt;
  /// Whether to append a batch of zeros to the keys and values.
  TORCH_ARG(bool, add_zero_attn) = false;
  /// Dropout probability on the attention probabilities (when `training`).
  TORCH_ARG(double, dropout_p) = 0.0;
  /// Whether dropout applies.
  TORCH_ARG(bool, training) = true;
  /// `(N, S)` or `(S)`: true (or added `-inf`) where a key is padding.
  TORCH_ARG(std::optional<at::Tensor>, key_padding_mask) = std::nullopt;
  /// `(L, S)` or `(N*H, L, S)`: true where attention is not allowed, or added to the scores.
  TORCH_ARG(std::optional<at::Tensor>, attn_mask) = std::nullopt;
  /// Whether to return the attention weights.
  TORCH_ARG(bool, need_weights) = true;
  /// Whether the weights are averaged over heads (else per head).
  TORCH_ARG(bool, average_attn_weights) = true;
  /// Causal attention; without `attn_mask` it needs no mask.
  TORCH_ARG(bool, is_causal) = false;
  /// Whether inputs and outputs are `(N, L, E)` instead of `(L, N, E)`.
  TORCH_ARG(bool, batch_first) = false;
};

/// `torchmha::multi_head_attention` with its arguments given by name.
TORCHMHA_API std::tuple<at::Tensor, at::Tensor> multi_head_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const MultiHeadAttentionFuncOptions& options);

}  // namespace torchmha
