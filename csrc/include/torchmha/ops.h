#pragma once

#include <ATen/core/Tensor.h>
#include <torchmha/export.h>

#include <optional>
#include <tuple>

namespace torchmha {

/// Multi-head attention, `torch.nn.functional.multi_head_attention_forward`'s
/// semantics, as the one registered op `torchmha::multi_head_attention`.
///
/// This entry point calls the op through the dispatcher, so autograd, autocast
/// and tracing see the same op as Python and TorchScript do.
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
    const std::optional<at::Tensor>& out_proj_bias, const std::optional<at::Tensor>& bias_k,
    const std::optional<at::Tensor>& bias_v, bool add_zero_attn, double dropout_p, bool training,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& attn_mask,
    bool need_weights, bool average_attn_weights, bool is_causal, bool batch_first);

}  // namespace torchmha
