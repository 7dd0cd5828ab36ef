#pragma once

#include <torch/arg.h>
#include <torchmha/export.h>

#include <cstdint>

namespace torchmha {

/// Options for `torchmha::MultiHeadAttention`, mirroring `torch.nn.MultiheadAttention`.
///
/// Example:
/// ```
/// torchmha::MultiHeadAttention mha(
///     torchmha::MultiHeadAttentionOptions(512, 8).dropout(0.1).batch_first(true));
/// ```
struct TORCHMHA_API MultiHeadAttentionOptions {
  MultiHeadAttentionOptions(int64_t embed_dim, int64_t num_heads);

  /// Total dimension of the model; split across `num_heads` heads.
  TORCH_ARG(int64_t, embed_dim);
  /// Number of parallel attention heads; must divide `embed_dim`.
  TORCH_ARG(int64_t, num_heads);
  /// Dropout probability on the attention probabilities (training only).
  TORCH_ARG(double, dropout) = 0.0;
  /// Whether the input and output projections have biases.
  TORCH_ARG(bool, bias) = true;
  /// Whether to append learned bias vectors to the keys and values.
  TORCH_ARG(bool, add_bias_kv) = false;
  /// Whether to append a batch of zeros to the keys and values.
  TORCH_ARG(bool, add_zero_attn) = false;
  /// Number of features in `key`; defaults to `embed_dim`.
  TORCH_ARG(int64_t, kdim);
  /// Number of features in `value`; defaults to `embed_dim`.
  TORCH_ARG(int64_t, vdim);
  /// Whether inputs and outputs are `(batch, seq, feature)` instead of `(seq, batch, feature)`.
  TORCH_ARG(bool, batch_first) = false;
};

/// Options for `torchmha::TextbookMultiHeadAttention`: the chapter's `(h, d_model, dropout)`.
struct TORCHMHA_API TextbookMultiHeadAttentionOptions {
  TextbookMultiHeadAttentionOptions(int64_t h, int64_t d_model);

  /// Number of heads.
  TORCH_ARG(int64_t, h);
  /// Model dimension; must be divisible by `h`.
  TORCH_ARG(int64_t, d_model);
  /// Dropout probability on the attention probabilities (training only).
  TORCH_ARG(double, dropout) = 0.1;
};

}  // namespace torchmha
