#pragma once

// The op's arguments as one value, so checks and math take a single parameter.
#include <ATen/core/Tensor.h>

#include <optional>

namespace torchmha::composite {

struct Arguments {
  const at::Tensor& query;
  const at::Tensor& key;
  const at::Tensor& value;
  int64_t num_heads;
  const std::optional<at::Tensor>& in_proj_weight;
  const std::optional<at::Tensor>& in_proj_bias;
  const std::optional<at::Tensor>& q_proj_weight;
  const std::optional<at::Tensor>& k_proj_weight;
  const std::optional<at::Tensor>& v_proj_weight;
  const at::Tensor& out_proj_weight;
  const std::optional<at::Tensor>& out_proj_bias;
  const std::optional<at::Tensor>& bias_k;
  const std::optional<at::Tensor>& bias_v;
  bool add_zero_attn;
  double dropout_p;
  bool training;
  const std::optional<at::Tensor>& key_padding_mask;
  const std::optional<at::Tensor>& attn_mask;
  bool need_weights;
  bool average_attn_weights;
  bool is_causal;
  bool batch_first;
  std::optional<int64_t> num_kv_heads;
  std::optional<double> rope_theta;
  std::optional<int64_t> rotary_dim;
  bool rotary_interleaved;
  const std::optional<at::Tensor>& positions;
  const std::optional<at::Tensor>& cache_key;
  const std::optional<at::Tensor>& cache_value;
  const std::optional<at::Tensor>& cache_lengths;

  bool is_batched() const { return query.dim() == 3; }
  // Batch-first layout also covers unbatched inputs, which gain a leading batch of one.
  bool is_batch_first() const { return batch_first || !is_batched(); }
  // Dimension of the sequence in query/key/value as given.
  int64_t sequence_dim() const { return is_batched() && batch_first ? 1 : 0; }
  bool has_packed_weight() const { return in_proj_weight.has_value() && in_proj_weight->defined(); }
  int64_t kv_heads() const { return num_kv_heads.value_or(num_heads); }
  // Query heads that share one key/value head.
  int64_t group_size() const { return num_heads / kv_heads(); }
  bool has_rotary() const { return rope_theta.has_value(); }
  // A key/value cache: checks make sure all three of its tensors come together.
  bool has_cache() const { return cache_key.has_value() && cache_key->defined(); }
  // Features of the key and value projections: num_kv_heads heads of embed_dim / num_heads.
  c10::SymInt kv_dim() const { return query.sym_size(-1) / num_heads * kv_heads(); }
};

// True when an optional tensor argument is present and defined.
inline bool given(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined();
}

// Raises c10::Error (ValueError/RuntimeError in Python) naming the argument and shapes.
void check_arguments(const Arguments& args);

}  // namespace torchmha::composite
