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
/// `(L, E)`. Give either `in_proj_weight` `(E + 2 kv_dim, E)` or all three of
/// `q_proj_weight` `(E, E)`, `k_proj_weight` `(kv_dim, kdim)`, `v_proj_weight`
/// `(kv_dim, vdim)`, where `kv_dim = num_kv_heads * E / num_heads` (`E` at the
/// defaults). Boolean masks are true where attention is *not* allowed;
/// floating masks are added to the scores. Returns `(output, weights)`;
/// `weights` is an empty tensor when `need_weights` is false.
///
/// Grouped-query attention: `num_kv_heads` key/value heads (nullopt: `num_heads`),
/// query head `h` attending with key/value head `h / (num_heads / num_kv_heads)`.
/// Rotary embeddings: with `rope_theta`, the leading `rotary_dim` features of each
/// query and key head (nullopt: all) rotate by `position * rope_theta^(-2i / rotary_dim)`
/// after the projections, pairing feature `i` with `i + rotary_dim / 2`, or `2i` with
/// `2i + 1` when `rotary_interleaved`. `positions` `(L)` or `(N, L)` gives the query
/// tokens' positions (keys share them); by default queries and keys are at 0, 1, 2, ...
///
/// Key/value cache (incremental decoding), all three or none: `cache_key` and
/// `cache_value` `(N, num_kv_heads, max_seq_len, head_dim)` in the dtype of `query`
/// (keys stored after rotation), `cache_lengths` int64 `(N)` (unbatched: `(1)`), every
/// one of them updated in place. `key` and `value` are the new tokens (the length of
/// `query`); entry `b`'s new keys and values are written at `cache_lengths[b] + i`,
/// then the queries attend over the entry's cached positions; with `is_causal`, new
/// token `i` sees positions `<= cache_lengths[b] + i`. Rotary positions follow the
/// cache. A bool `key_padding_mask` over the new tokens (right padding) advances each
/// entry by its real tokens only. Weights are over the cache's `max_seq_len` positions,
/// zero beyond each entry's length. Checked before anything is written; for inference
/// only (refused when an input requires grad under grad mode).
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
    bool average_attn_weights = true, bool is_causal = false, bool batch_first = false,
    std::optional<int64_t> num_kv_heads = std::nullopt,
    std::optional<double> rope_theta = std::nullopt,
    std::optional<int64_t> rotary_dim = std::nullopt, bool rotary_interleaved = false,
    const std::optional<at::Tensor>& positions = std::nullopt,
    const std::optional<at::Tensor>& cache_key = std::nullopt,
    const std::optional<at::Tensor>& cache_value = std::nullopt,
    const std::optional<at::Tensor>& cache_lengths = std::nullopt);

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
  /// Packed input projection `(E + 2 kv_dim, E)`; or give the three separate ones.
  TORCH_ARG(std::optional<at::Tensor>, in_proj_weight) = std::nullopt;
  /// Packed input projection bias `(E + 2 kv_dim)`.
  TORCH_ARG(std::optional<at::Tensor>, in_proj_bias) = std::nullopt;
  /// Separate query projection `(E, E)`.
  TORCH_ARG(std::optional<at::Tensor>, q_proj_weight) = std::nullopt;
  /// Separate key projection `(kv_dim, kdim)`.
  TORCH_ARG(std::optional<at::Tensor>, k_proj_weight) = std::nullopt;
  /// Separate value projection `(kv_dim, vdim)`.
  TORCH_ARG(std::optional<at::Tensor>, v_proj_weight) = std::nullopt;
  /// Output projection bias `(E)`.
  TORCH_ARG(std::optional<at::Tensor>, out_proj_bias) = std::nullopt;
  /// Learned bias appended to the keys `(1, 1, kv_dim)`; goes with `bias_v`.
  TORCH_ARG(std::optional<at::Tensor>, bias_k) = std::nullopt;
  /// Learned bias appended to the values `(1, 1, kv_dim)`; goes with `bias_k`.
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
  /// Key/value heads (grouped-query attention); must divide `num_heads`; nullopt: `num_heads`.
  TORCH_ARG(std::optional<int64_t>, num_kv_heads) = std::nullopt;
  /// Base of the rotary position embeddings on queries and keys; nullopt: none.
  TORCH_ARG(std::optional<double>, rope_theta) = std::nullopt;
  /// Leading features of each head that rotate (even); nullopt: the whole head.
  TORCH_ARG(std::optional<int64_t>, rotary_dim) = std::nullopt;
  /// Pair features `2i` and `2i + 1` (GPT-J) instead of `i` and `i + rotary_dim / 2`.
  TORCH_ARG(bool, rotary_interleaved) = false;
  /// Integer positions of the query tokens, `(L)` or `(N, L)`; keys share them.
  TORCH_ARG(std::optional<at::Tensor>, positions) = std::nullopt;
  /// Cached keys `(N, num_kv_heads, max_seq_len, head_dim)`, written in place.
  TORCH_ARG(std::optional<at::Tensor>, cache_key) = std::nullopt;
  /// Cached values `(N, num_kv_heads, max_seq_len, head_dim)`, written in place.
  TORCH_ARG(std::optional<at::Tensor>, cache_value) = std::nullopt;
  /// Each batch entry's cached length, int64 `(N)`, advanced in place.
  TORCH_ARG(std::optional<at::Tensor>, cache_lengths) = std::nullopt;
};

/// `torchmha::multi_head_attention` with its arguments given by name.
TORCHMHA_API std::tuple<at::Tensor, at::Tensor> multi_head_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const MultiHeadAttentionFuncOptions& options);

}  // namespace torchmha
