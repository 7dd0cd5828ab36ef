#pragma once

// Scaled dot-product attention over split heads, the two ways the op needs it: fused (no
// probabilities kept) and with the attention weights returned.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchmha::composite {

// query (N, H, L, D), key (N, H, S, D), value (N, H, S, Dv); `mask` is additive (-inf where
// attention is not allowed) and broadcastable to (N, H, L, S). A query row whose keys are all
// masked attends to nothing: a zero output row, zero weights, finite gradients.

// True while a torch.func transform (grad, vjp, jacrev, jacfwd, vmap) runs: functorch then wraps
// tensors and supports no C++ autograd Function, so the op composes plain ATen ops only.
bool under_function_transform();

// A real tensor with concrete sizes: not traced (fake, functional or symbolic) and not under a
// torch.func transform, so its data may be updated in place, loops over its sizes are loops, not
// graph unrolling, and the CPU's blocks (a C++ autograd Function) may take it.
bool is_concrete(const at::Tensor& tensor);

// The dtype in which ATen's GEMMs compute with `tensor`: autocast's lower precision where autocast
// is on for its device and casts it (a floating dtype but float64), else its own dtype.
at::ScalarType gemm_dtype(const at::Tensor& tensor);

// tensor.contiguous(), copied as 8-byte words where the innermost rows allow it, no gradient
// flows (a dtype view has none) and the tensor has at least 1 MiB: the GPU's strided copy kernel
// then indexes fewer elements (the figures, and why the floor: scripts/bench/NOTES.md).
at::Tensor contiguous_in_words(const at::Tensor& tensor);

// 1 / sqrt(head_dim), the scores' scale.
double softmax_scale(const at::Tensor& query);

// scale * query key_t + mask for batched (B, L, D) x (B, D, S) operands, the scale and the mask
// (broadcastable to (B, L, S)) applied inside one GEMM: no scaled copy of the query, and low
// precision rounds the sum once, as PyTorch's baddbmm does.
at::Tensor scaled_scores(const at::Tensor& query, const at::Tensor& key_t,
                         const std::optional<at::Tensor>& mask, double scale);

// The attention output (N, H, L, Dv) through at::scaled_dot_product_attention. With
// `grouped_heads`, key and value have fewer heads than query, each serving a group of query heads.
at::Tensor fused_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           std::optional<at::Tensor> mask, double dropout_p, bool is_causal,
                           bool grouped_heads = false);

// True when attention_with_weights computes on the CPU block by block (blocked_attention.h): a
// concrete CPU query, no dropout, a mask without grad and (N, H, L, S) scores of `score_elements`
// (in the query's gemm_dtype) beyond four blocks. Judged from sizes, so the op can lay out the
// projections before making them.
bool weights_in_cpu_blocks(const at::Tensor& query, int64_t score_elements, double dropout_p,
                           const std::optional<at::Tensor>& mask);

// The attention output and the attention probabilities, (N, H, L, S), or averaged over heads,
// (N, L, S). With dropout, the returned weights are the dropped-out probabilities that made the
// output, as in PyTorch.
std::tuple<at::Tensor, at::Tensor> attention_with_weights(const at::Tensor& query,
                                                          const at::Tensor& key,
                                                          const at::Tensor& value,
                                                          std::optional<at::Tensor> mask,
                                                          double dropout_p, bool average_heads);

}  // namespace torchmha::composite
