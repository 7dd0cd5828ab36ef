#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>
#include <torchmha/export.h>

#include <ostream>

namespace torchmha {

/// Sizes, dtype and device of a `torchmha::KVCache`.
struct TORCHMHA_API KVCacheOptions {
  KVCacheOptions(int64_t batch_size, int64_t num_kv_heads, int64_t max_seq_len, int64_t head_dim);

  /// Sequences decoded side by side.
  TORCH_ARG(int64_t, batch_size);
  /// Key/value heads of the attention that uses the cache.
  TORCH_ARG(int64_t, num_kv_heads);
  /// Positions per sequence (prompt and generated tokens).
  TORCH_ARG(int64_t, max_seq_len);
  /// Features per head.
  TORCH_ARG(int64_t, head_dim);
  /// dtype of the keys and values (the attention's).
  TORCH_ARG(c10::ScalarType, dtype) = c10::kFloat;
  /// Device of every tensor of the cache.
  TORCH_ARG(c10::Device, device) = c10::Device(c10::kCPU);
};

/// The keys and values of earlier tokens for incremental decoding, as Python's
/// `torchmha.KVCache`: buffers `key` and `value` `(batch_size, num_kv_heads, max_seq_len,
/// head_dim)` (keys after their rotary embedding) and `seq_lens` (int64, `(batch_size)`),
/// written by `torchmha::MultiHeadAttention::forward(..., kv_cache)` (or the op's
/// `cache_key`, `cache_value`, `cache_lengths`) at each entry's own length.
class TORCHMHA_API KVCacheImpl : public torch::nn::Cloneable<KVCacheImpl> {
 public:
  KVCacheImpl(int64_t batch_size, int64_t num_kv_heads, int64_t max_seq_len, int64_t head_dim)
      : KVCacheImpl(KVCacheOptions(batch_size, num_kv_heads, max_seq_len, head_dim)) {}
  explicit KVCacheImpl(const KVCacheOptions& options_);

  /// Empties every entry: lengths 0, keys and values zero (in place once created).
  void reset() override;

  /// Entry `b` becomes what entry `indices[b]` was (beam search: select and repeat entries),
  /// in place; `indices` is integer `(batch_size)`.
  void reorder(const at::Tensor& indices);

  /// Casts keys and values; `seq_lens` stays int64.
  using torch::nn::Module::to;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;

  /// Pretty prints `torchmha::KVCache(batch_size=..., ...)`.
  void pretty_print(std::ostream& stream) const override;

  /// The options with which this cache was constructed.
  KVCacheOptions options;

  at::Tensor key;
  at::Tensor value;
  at::Tensor seq_lens;

 private:
  void keep_lengths_int64();
};

/// A `ModuleHolder` for `KVCacheImpl`.
TORCH_MODULE(KVCache);

}  // namespace torchmha
