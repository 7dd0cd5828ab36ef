#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torchmha/export.h>
#include <torchmha/kv_cache.h>
#include <torchmha/options.h>

#include <optional>
#include <ostream>
#include <tuple>

namespace torchmha {

/// Multi-head attention with `torch.nn.MultiheadAttention`'s arguments, parameter
/// names and results, computed by the op `torchmha::multi_head_attention`.
///
/// Parameters: `in_proj_weight` (or `q_proj_weight`, `k_proj_weight`,
/// `v_proj_weight` when kdim/vdim differ from embed_dim), `in_proj_bias`,
/// `out_proj.weight`, `out_proj.bias`, and `bias_k`, `bias_v` with add_bias_kv,
/// so a PyTorch state dict loads by name.
///
/// With `num_kv_heads`, the key and value projections produce
/// `kv_dim = num_kv_heads * head_dim` features: `in_proj_weight` is
/// `(embed_dim + 2 * kv_dim, embed_dim)`, `in_proj_bias` `(embed_dim + 2 * kv_dim)`,
/// `k_proj_weight` `(kv_dim, kdim)`, `v_proj_weight` `(kv_dim, vdim)`,
/// `bias_k`/`bias_v` `(1, 1, kv_dim)`. At the default options the parameters
/// are exactly `torch.nn.MultiheadAttention`'s.
class TORCHMHA_API MultiHeadAttentionImpl : public torch::nn::Cloneable<MultiHeadAttentionImpl> {
 public:
  MultiHeadAttentionImpl(int64_t embed_dim, int64_t num_heads)
      : MultiHeadAttentionImpl(MultiHeadAttentionOptions(embed_dim, num_heads)) {}
  explicit MultiHeadAttentionImpl(const MultiHeadAttentionOptions& options_);

  /// Returns `(output, weights)`. `weights` is undefined when `need_weights` is false;
  /// else it is per query head (`(N, num_heads, L, S)` with `average_attn_weights` false).
  /// Boolean masks are true where attention is not allowed; float masks are added.
  /// `is_causal` without `attn_mask` is causal attention. `positions` (integer `(L)` or
  /// `(N, L)`; `(L)` for unbatched inputs) are the query tokens' rotary positions, which the
  /// keys share (so it needs as many keys as queries); undefined means `0, 1, 2, ...`.
  /// `kv_cache` (from `new_kv_cache`; empty holder: none): the inputs are the new tokens,
  /// whose keys and values are written at each entry's length before the queries attend over
  /// the entry's cache (as Python's `forward(..., kv_cache=cache)`; run under
  /// `torch::NoGradGuard` or `c10::InferenceMode`).
  std::tuple<torch::Tensor, torch::Tensor> forward(
      const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
      const torch::Tensor& key_padding_mask = {}, bool need_weights = true,
      const torch::Tensor& attn_mask = {}, bool average_attn_weights = true, bool is_causal = false,
      const torch::Tensor& positions = {}, const KVCache& kv_cache = KVCache(nullptr));

  /// An empty cache for this module's key/value heads: `batch_size` sequences of up to
  /// `max_seq_len` tokens, in the dtype and on the device of the weights unless given.
  KVCache new_kv_cache(int64_t batch_size, int64_t max_seq_len,
                       std::optional<c10::ScalarType> dtype = std::nullopt,
                       std::optional<c10::Device> device = std::nullopt) const;

  /// Creates the parameters and initialises them.
  void reset() override;

  /// Initialises the parameters as `torch.nn.MultiheadAttention` does.
  void reset_parameters();

  /// Pretty prints `torchmha::MultiHeadAttention(embed_dim=..., num_heads=..., ...)`.
  void pretty_print(std::ostream& stream) const override;

  /// The options with which this module was constructed.
  MultiHeadAttentionOptions options;

  /// Features per head: `embed_dim / num_heads`.
  int64_t head_dim() const;
  /// Key/value heads: `num_kv_heads`, or `num_heads` when it is not set.
  int64_t num_kv_heads() const;
  /// Features of the projected keys and values: `num_kv_heads() * head_dim()`.
  int64_t kv_dim() const;

  /// True when kdim == vdim == embed_dim, so one packed `in_proj_weight` is used.
  bool qkv_same_embed_dim = true;
  torch::Tensor in_proj_weight;
  torch::Tensor in_proj_bias;
  torch::Tensor q_proj_weight;
  torch::Tensor k_proj_weight;
  torch::Tensor v_proj_weight;
  torch::Tensor bias_k;
  torch::Tensor bias_v;
  torch::nn::Linear out_proj{nullptr};

 protected:
  FORWARD_HAS_DEFAULT_ARGS({3, torch::nn::AnyValue(torch::Tensor())},
                           {4, torch::nn::AnyValue(true)},
                           {5, torch::nn::AnyValue(torch::Tensor())},
                           {6, torch::nn::AnyValue(true)}, {7, torch::nn::AnyValue(false)},
                           {8, torch::nn::AnyValue(torch::Tensor())},
                           {9, torch::nn::AnyValue(KVCache(nullptr))})
};

/// A `ModuleHolder` for `MultiHeadAttentionImpl`; see LibTorch's module ownership semantics.
TORCH_MODULE(MultiHeadAttention);

}  // namespace torchmha
