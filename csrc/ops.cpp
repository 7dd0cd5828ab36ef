// The schemas of torchmha (the op, and the private kernel op its weights path calls) and the
// op's dispatcher-typed C++ entry point.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torchmha/ops.h>

#include <utility>

namespace torchmha {

using MultiHeadAttentionSchema = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double, bool,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, bool, bool, bool,
    std::optional<int64_t>, std::optional<double>, std::optional<int64_t>, bool,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

std::tuple<at::Tensor, at::Tensor> multi_head_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, const at::Tensor& out_proj_weight,
    const std::optional<at::Tensor>& out_proj_bias, const std::optional<at::Tensor>& bias_k,
    const std::optional<at::Tensor>& bias_v, bool add_zero_attn, double dropout_p, bool training,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& attn_mask,
    bool need_weights, bool average_attn_weights, bool is_causal, bool batch_first,
    std::optional<int64_t> num_kv_heads, std::optional<double> rope_theta,
    std::optional<int64_t> rotary_dim, bool rotary_interleaved,
    const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& cache_key,
    const std::optional<at::Tensor>& cache_value, const std::optional<at::Tensor>& cache_lengths) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmha::multi_head_attention", "")
                       .typed<MultiHeadAttentionSchema>();
  return op.call(query, key, value, num_heads, in_proj_weight, in_proj_bias, q_proj_weight,
                 k_proj_weight, v_proj_weight, out_proj_weight, out_proj_bias, bias_k, bias_v,
                 add_zero_attn, dropout_p, training, key_padding_mask, attn_mask, need_weights,
                 average_attn_weights, is_causal, batch_first, num_kv_heads, rope_theta, rotary_dim,
                 rotary_interleaved, positions, cache_key, cache_value, cache_lengths);
}

MultiHeadAttentionFuncOptions::MultiHeadAttentionFuncOptions(int64_t num_heads,
                                                             at::Tensor out_proj_weight)
    : num_heads_(num_heads), out_proj_weight_(std::move(out_proj_weight)) {}

std::tuple<at::Tensor, at::Tensor> multi_head_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const MultiHeadAttentionFuncOptions& options) {
  return multi_head_attention(
      query, key, value, options.num_heads(), options.in_proj_weight(), options.in_proj_bias(),
      options.q_proj_weight(), options.k_proj_weight(), options.v_proj_weight(),
      options.out_proj_weight(), options.out_proj_bias(), options.bias_k(), options.bias_v(),
      options.add_zero_attn(), options.dropout_p(), options.training(), options.key_padding_mask(),
      options.attn_mask(), options.need_weights(), options.average_attn_weights(),
      options.is_causal(), options.batch_first(), options.num_kv_heads(), options.rope_theta(),
      options.rotary_dim(), options.rotary_interleaved(), options.positions(), options.cache_key(),
      options.cache_value(), options.cache_lengths());
}

TORCH_LIBRARY(torchmha, m) {
  m.def(
      "multi_head_attention(Tensor query, Tensor key, Tensor value, int num_heads, "
      "Tensor? in_proj_weight, Tensor? in_proj_bias, Tensor? q_proj_weight, "
      "Tensor? k_proj_weight, Tensor? v_proj_weight, Tensor out_proj_weight, "
      "Tensor? out_proj_bias=None, Tensor? bias_k=None, Tensor? bias_v=None, "
      "bool add_zero_attn=False, float dropout_p=0.0, bool training=True, "
      "Tensor? key_padding_mask=None, Tensor? attn_mask=None, bool need_weights=True, "
      "bool average_attn_weights=True, bool is_causal=False, bool batch_first=False, "
      "int? num_kv_heads=None, float? rope_theta=None, int? rotary_dim=None, "
      "bool rotary_interleaved=False, Tensor? positions=None, Tensor(a!)? cache_key=None, "
      "Tensor(b!)? cache_value=None, Tensor(c!)? cache_lengths=None) -> (Tensor, Tensor)");
  // mean over heads of softmax(scores, -1): (N, H, L, S) -> (N, L, S); see
  // csrc/composite/head_mean_softmax.h.
  m.def("_head_mean_softmax(Tensor scores) -> Tensor");
}

}  // namespace torchmha
