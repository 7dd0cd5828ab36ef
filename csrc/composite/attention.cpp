#include "attention.h"

#include "blocked_attention.h"
#include "head_mean_softmax.h"

#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <cmath>

namespace torchmha::composite {
namespace {

// Rows with every key masked would give NaN; their mask row becomes zero, and the result row is
// zeroed afterwards. Computed on the mask, which is much smaller than the scores.
MaskedRows fix_fully_masked_rows(std::optional<at::Tensor> mask) {
  if (!mask) {
    return {};
  }
  auto rows = mask->isneginf().all(-1, /*keepdim=*/true);
  return {mask->masked_fill(rows, 0), rows};
}

// Forward-mode AD (torch.autograd.forward_ad) has no formula for out= ops nor C++ Functions (the
// CPU's blocks, the head-mean kernel's autograd).
bool carries_forward_grad(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const std::optional<at::Tensor>& mask) {
  const auto dual = [](const at::Tensor& tensor) { return tensor._fw_grad(/*level=*/0).defined(); };
  return dual(query) || dual(key) || dual(value) || (mask && dual(*mask));
}

bool needs_autograd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const std::optional<at::Tensor>& mask) {
  return at::GradMode::is_enabled() && (query.requires_grad() || key.requires_grad() ||
                                        value.requires_grad() || (mask && mask->requires_grad()));
}

at::Tensor sdpa(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                const MaskedRows& fix, double dropout_p, bool is_causal,
                bool grouped_heads = false) {
  auto output = at::scaled_dot_product_attention(query, key, value, fix.mask, dropout_p, is_causal,
                                                 /*scale=*/std::nullopt, grouped_heads);
  return fix.fully_masked_rows ? output.masked_fill(*fix.fully_masked_rows, 0) : output;
}

// (N, H, L, S) scale * q k^T + mask from one batched GEMM over N * H.
at::Tensor head_scores(const at::Tensor& query, const at::Tensor& key,
                       const std::optional<at::Tensor>& mask) {
  const auto sizes = query.sym_sizes();
  const c10::SymInt batch_heads = sizes[0] * sizes[1];
  const c10::SymInt source_len = key.sym_size(2);
  const std::array<c10::SymInt, 4> score_sizes{sizes[0], sizes[1], sizes[2], source_len};
  std::optional<at::Tensor> batched_mask;
  if (mask) {
    batched_mask =
        mask->expand_symint(score_sizes).reshape_symint({batch_heads, sizes[2], source_len});
  }
  return scaled_scores(query.reshape_symint({batch_heads, sizes[2], sizes[3]}),
                       key.reshape_symint({batch_heads, source_len, sizes[3]}).transpose(1, 2),
                       batched_mask, softmax_scale(query))
      .view_symint(score_sizes);
}

// Where the device has a head-mean kernel, the averaged weights need no per-head probabilities,
// so the output can come from SDPA's fused kernels, which pays off in half precision
// (scripts/bench/NOTES.md has the figures). float32 keeps the explicit path:
// there SDPA is no faster than the explicit GEMMs, and choosing by size would put guards on traced
// shapes. The choice reads only the device, dtype and flags, so eager calls and traced graphs
// (compile, export) compute the same way.
bool weights_by_head_mean_kernel(const at::Tensor& query, bool average_heads, double dropout_p,
                                 bool mask_needs_grad) {
  constexpr int64_t max_heads = 2048;  // the kernel keeps two numbers per head in shared memory
  const auto dtype = query.scalar_type();
  return average_heads && dropout_p == 0.0 && !mask_needs_grad &&
         (dtype == at::kHalf || dtype == at::kBFloat16) &&
         has_head_mean_softmax_kernel(query.device().type()) &&
         // Under autocast, softmax would return float32 weights; the explicit path keeps that.
         !at::autocast::is_autocast_enabled(query.device().type()) &&
         // The kernel's autograd is a C++ Function, which no torch.func transform takes.
         !under_function_transform() &&
         query.sym_size(1).guard_int(__FILE__, __LINE__) <= max_heads;
}

// Asked only of devices autocast knows: it refuses any other (Meta, for one).
bool autocast_enabled_on(c10::DeviceType device) {
  return at::autocast::is_autocast_available(device) && at::autocast::is_autocast_enabled(device);
}

at::Tensor cast_to(const at::Tensor& tensor, at::ScalarType dtype) {
  return tensor.scalar_type() == dtype ? tensor : tensor.to(dtype);
}

// The blocks' out= GEMMs are not autocast: under autocast their operands are cast here as the
// unblocked path's baddbmm and bmm would cast them (float32 masks, bias_k and bias_v included).
std::tuple<at::Tensor, at::Tensor> blocks_in_gemm_dtype(const at::Tensor& query,
                                                        const at::Tensor& key,
                                                        const at::Tensor& value,
                                                        const MaskedRows& fix, bool average_heads) {
  const auto dtype = gemm_dtype(query);
  MaskedRows masked = fix;
  if (masked.mask) {
    masked.mask = cast_to(*masked.mask, dtype);
  }
  return blocked_attention_with_weights(cast_to(query, dtype), cast_to(key, dtype),
                                        cast_to(value, dtype), masked, average_heads);
}

}  // namespace

bool under_function_transform() {
  // functorch includes this key in the thread's dispatch keys exactly while its stack of
  // transforms is not empty, the condition under which torch::autograd::Function refuses to run.
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

bool is_concrete(const at::Tensor& tensor) {
  const auto* impl = tensor.unsafeGetTensorImpl();
  return !impl->is_python_dispatch() && !impl->has_symbolic_sizes_strides() &&
         !at::functionalization::impl::isFunctionalTensor(tensor) && !under_function_transform();
}

at::ScalarType gemm_dtype(const at::Tensor& tensor) {
  const auto device = tensor.device().type();
  const bool autocast = autocast_enabled_on(device) && tensor.is_floating_point() &&
                        tensor.scalar_type() != at::kDouble;
  return autocast ? at::autocast::get_lower_precision_fp_from_device_type(device)
                  : tensor.scalar_type();
}

at::Tensor contiguous_in_words(const at::Tensor& tensor) {
  constexpr int64_t word_bytes = 8;
  // Below this the copy is cheap anyway and the two dtype views would only add call overhead.
  constexpr int64_t min_bytes = int64_t{1} << 20;
  const int64_t ratio = word_bytes / static_cast<int64_t>(tensor.element_size());
  const bool fits = tensor.dim() > 0 && ratio > 1 && is_concrete(tensor) &&
                    static_cast<int64_t>(tensor.nbytes()) >= min_bytes &&
                    !(at::GradMode::is_enabled() && tensor.requires_grad()) &&
                    tensor.stride(-1) == 1 && tensor.size(-1) % ratio == 0 &&
                    tensor.storage_offset() % ratio == 0 && !tensor.is_contiguous();
  if (!fits) {
    return tensor.contiguous();
  }
  for (int64_t dim = 0; dim + 1 < tensor.dim(); ++dim) {
    if (tensor.stride(dim) % ratio != 0) {
      return tensor.contiguous();
    }
  }
  return tensor.view(at::kLong).contiguous().view(tensor.scalar_type());
}

bool weights_in_cpu_blocks(const at::Tensor& query, int64_t score_elements, double dropout_p,
                           const std::optional<at::Tensor>& mask) {
  return query.device().is_cpu() && is_concrete(query) && dropout_p == 0.0 &&
         !(mask && mask->requires_grad()) &&
         scores_outgrow_a_block(score_elements,
                                static_cast<int64_t>(c10::elementSize(gemm_dtype(query))));
}

double softmax_scale(const at::Tensor& query) {
  const int64_t head_dim = query.sym_size(-1).guard_int(__FILE__, __LINE__);
  return 1.0 / std::sqrt(static_cast<double>(head_dim));
}

at::Tensor scaled_scores(const at::Tensor& query, const at::Tensor& key_t,
                         const std::optional<at::Tensor>& mask, double scale) {
  if (mask) {
    return at::baddbmm(*mask, query, key_t, /*beta=*/1, /*alpha=*/scale);
  }
  // beta = 0: the GEMM never reads its addend, so an unfilled one-element tensor stands in.
  return at::baddbmm(at::empty({1, 1, 1}, query.options()), query, key_t, /*beta=*/0,
                     /*alpha=*/scale);
}

at::Tensor fused_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           std::optional<at::Tensor> mask, double dropout_p, bool is_causal,
                           bool grouped_heads) {
  return sdpa(query, key, value, fix_fully_masked_rows(std::move(mask)), dropout_p, is_causal,
              grouped_heads);
}

std::tuple<at::Tensor, at::Tensor> attention_with_weights(const at::Tensor& query,
                                                          const at::Tensor& key,
                                                          const at::Tensor& value,
                                                          std::optional<at::Tensor> mask,
                                                          double dropout_p, bool average_heads) {
  const bool differentiable = needs_autograd(query, key, value, mask);
  const bool forward_ad = carries_forward_grad(query, key, value, mask);
  const bool concrete = is_concrete(query) && is_concrete(key) && is_concrete(value) && !forward_ad;
  const MaskedRows fix = fix_fully_masked_rows(mask);

  // On the CPU, large scores go block by block (any other case composes ATen ops directly).
  if (concrete &&
      weights_in_cpu_blocks(query, query.size(0) * query.size(1) * query.size(2) * key.size(2),
                            dropout_p, fix.mask)) {
    return blocks_in_gemm_dtype(query, key, value, fix, average_heads);
  }
  const bool mask_needs_grad = fix.mask && fix.mask->requires_grad();
  if (!forward_ad &&
      weights_by_head_mean_kernel(query, average_heads, dropout_p, mask_needs_grad)) {
    // Scores with the unfixed mask: a fully masked row is all -inf, which adds zero weight.
    auto weights = head_mean_softmax(head_scores(query, key, mask));
    return {sdpa(query, key, value, fix, 0.0, /*is_causal=*/false), std::move(weights)};
  }

  const auto sizes = query.sym_sizes();
  const c10::SymInt batch_heads = sizes[0] * sizes[1];
  const c10::SymInt source_len = key.sym_size(2);
  auto scores = head_scores(query, key, fix.mask);
  // Without autograd nothing keeps the scores, so each step may overwrite them; but the out=
  // softmax escapes autocast, which on CUDA gives float32 probabilities, as PyTorch's module has.
  const bool in_place = !differentiable && concrete && !autocast_enabled_on(query.device().type());
  auto probabilities =
      in_place ? at::_softmax_out(scores, scores, -1, false) : at::softmax(scores, -1);
  if (fix.fully_masked_rows) {
    probabilities = in_place ? probabilities.masked_fill_(*fix.fully_masked_rows, 0)
                             : probabilities.masked_fill(*fix.fully_masked_rows, 0);
  }
  if (dropout_p > 0.0) {
    probabilities = at::dropout(probabilities, dropout_p, /*train=*/true);
  }
  auto weights = average_heads ? probabilities.mean(1) : probabilities;
  const c10::SymInt value_dim = value.sym_size(3);
  auto output = at::bmm(probabilities.reshape_symint({batch_heads, sizes[2], source_len}),
                        value.reshape_symint({batch_heads, source_len, value_dim}));
  return {output.view_symint({sizes[0], sizes[1], sizes[2], value_dim}), weights};
}

}  // namespace torchmha::composite
