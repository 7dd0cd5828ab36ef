#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torchmha/export.h>
#include <torchmha/options.h>

#include <mutex>
#include <ostream>

namespace torchmha {

/// The chapter's multi-head attention API (`MultiHeadAttention(h, d_model, dropout)`
/// in "Introduction to NLP with Transformers", 4.4, after BERT-pytorch), as an adapter
/// over the op `torchmha::multi_head_attention`.
///
/// Parameters carry the chapter's names (`linear_layers.{0,1,2}` and `output_linear`),
/// so the chapter's state dict loads unchanged. Inputs are batch-first `(B, L, d_model)`.
class TORCHMHA_API TextbookMultiHeadAttentionImpl
    : public torch::nn::Cloneable<TextbookMultiHeadAttentionImpl> {
 public:
  TextbookMultiHeadAttentionImpl(int64_t h, int64_t d_model)
      : TextbookMultiHeadAttentionImpl(TextbookMultiHeadAttentionOptions(h, d_model)) {}
  explicit TextbookMultiHeadAttentionImpl(const TextbookMultiHeadAttentionOptions& options_);
  /// Copy and assignment (which `clone()` uses, perhaps beside `forward`) read `attn` under
  /// the source's lock; each module keeps a lock of its own.
  TextbookMultiHeadAttentionImpl(const TextbookMultiHeadAttentionImpl& other);
  TextbookMultiHeadAttentionImpl& operator=(const TextbookMultiHeadAttentionImpl& other);

  /// Returns the attention output `(B, L, d_model)`. `mask` is nonzero where attention is
  /// allowed and broadcasts to `(B, h, L, S)`, like the chapter's `(B, 1, L, S)` or `(B, 1, 1, S)`.
  /// The per-head probabilities `(B, h, L, S)` of this call are kept in `attn`. Threads may
  /// call `forward` of one module at once (each call's output is its own; see `attn`).
  torch::Tensor forward(const torch::Tensor& query, const torch::Tensor& key,
                        const torch::Tensor& value, const torch::Tensor& mask = {});

  void reset() override;

  /// Pretty prints `torchmha::TextbookMultiHeadAttention(h=..., d_model=..., dropout=...)`.
  void pretty_print(std::ostream& stream) const override;

  TextbookMultiHeadAttentionOptions options;
  /// Query, key and value projections, in that order.
  torch::nn::ModuleList linear_layers{nullptr};
  torch::nn::Linear output_linear{nullptr};
  /// Per-head attention probabilities of the last call (the chapter's `self.attn`). When
  /// threads share the module, `forward` writes it under a lock and it holds the probabilities
  /// of the call that finished last; read it then with `last_attn()`, not directly.
  torch::Tensor attn;

  /// `attn`, read under the lock that `forward` writes it under: safe while other threads call
  /// `forward`.
  torch::Tensor last_attn() const;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({3, torch::nn::AnyValue(torch::Tensor())})

 private:
  // Guards `attn`: unguarded, two calls' assignments race on its reference count (double free).
  mutable std::mutex attn_mutex_;
};

/// A `ModuleHolder` for `TextbookMultiHeadAttentionImpl`.
TORCH_MODULE(TextbookMultiHeadAttention);

}  // namespace torchmha
