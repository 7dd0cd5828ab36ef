#pragma once

#include <torch/arg.h>
#include <torchmha/export.h>

#include <cstdint>
#include <optional>

namespace torchmha {

/// Options for `torchmha::MultiHeadAttention`, mirroring `torch.nn.MultiheadAttention`.
///
/// Example:
/// ```
/// torchmha::MultiHeadAttention mha(
///     torchmha::MultiHeadAttentionOptions(512, 8).dropout(0.1).batch_first(true));
/// // Grouped-query attention with rotary embeddings, as in Llama-family decoders:
/// torchmha::MultiHeadAttention decoder(
///     torchmha::MultiHeadAttentionOptions(512, 8).num_kv_heads(2).rope_theta(10000.0));
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
  /// Number of key/value heads (grouped-query attention); `std::nullopt` means `num_heads`, 1 is
  /// multi-query attention. Must divide `num_heads`; query head `h` uses key/value head
  /// `h / (num_heads / num_kv_heads)`. The key and value projections produce
  /// `kv_dim = num_kv_heads * head_dim` features.
  TORCH_ARG(std::optional<int64_t>, num_kv_heads) = std::nullopt;
  /// Base of the rotary position embedding applied to queries and keys after their projections
  /// (and biases); `std::nullopt` means no rotary embedding. Must be positive and finite.
  TORCH_ARG(std::optional<double>, rope_theta) = std::nullopt;
  /// How many leading features of each head rotate (partial rotary, as GPT-NeoX); `std::nullopt`
  /// means all of `head_dim`. Even, at most `head_dim`; needs `rope_theta`.
  TORCH_ARG(std::optional<int64_t>, rotary_dim) = std::nullopt;
  /// Rotary pairing: false pairs feature `i` with `i + rotary_dim / 2` ("rotate half": Llama,
  /// GPT-NeoX); true pairs `2i` with `2i + 1` (GPT-J). True needs `rope_theta`.
  TORCH_ARG(bool, rotary_interleaved) = false;
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
