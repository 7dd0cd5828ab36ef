#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torchmha/export.h>
#include <torchmha/options.h>

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
class TORCHMHA_API MultiHeadAttentionImpl : public torch::nn::Cloneable<MultiHeadAttentionImpl> {
 public:
  MultiHeadAttentionImpl(int64_t embed_dim, int64_t num_heads)
      : MultiHeadAttentionImpl(MultiHeadAttentionOptions(embed_dim, num_heads)) {}
  explicit MultiHeadAttentionImpl(const MultiHeadAttentionOptions& options_);

  /// Returns `(output, weights)`. `weights` is undefined when `need_weights` is false.
  /// Boolean masks are true where attention is not allowed; float masks are added.
  /// `is_causal` without `attn_mask` is causal attention.
  std::tuple<torch::Tensor, torch::Tensor> forward(
      const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
      const torch::Tensor& key_padding_mask = {}, bool need_weights = true,
      const torch::Tensor& attn_mask = {}, bool average_attn_weights = true,
      bool is_causal = false);

  /// Creates the parameters and initialises them.
  void reset() override;

  /// Initialises the parameters as `torch.nn.MultiheadAttention` does.
  void reset_parameters();

  /// Pretty prints `torchmha::MultiHeadAttention(embed_dim=..., num_heads=..., ...)`.
  void pretty_print(std::ostream& stream) const override;

  /// The options with which this module was constructed.
  MultiHeadAttentionOptions options;

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
                           {6, torch::nn::AnyValue(true)}, {7, torch::nn::AnyValue(false)})
};

/// A `ModuleHolder` for `MultiHeadAttentionImpl`; see LibTorch's module ownership semantics.
TORCH_MODULE(MultiHeadAttention);

}  // namespace torchmha
