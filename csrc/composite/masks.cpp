#include "masks.h"

#include <ATen/ATen.h>

#include <limits>

namespace torchmha::composite {
namespace {

// Bool masks become -inf (never a finite fill, which would overflow fp16); float masks are added.
at::Tensor additive(const at::Tensor& mask, at::ScalarType dtype) {
  if (mask.scalar_type() == at::kBool) {
    return at::zeros_like(mask, mask.options().dtype(dtype))
        .masked_fill_(mask, -std::numeric_limits<double>::infinity());
  }
  return mask.to(dtype);
}

}  // namespace

at::Tensor causal_mask(const c10::SymInt& target_len, const c10::SymInt& source_len,
                       const at::TensorOptions& options) {
  return at::ones_symint({target_len, source_len}, options.dtype(at::kBool)).triu(1);
}

std::optional<at::Tensor> merged_additive_mask(const Arguments& args,
                                               const std::optional<at::Tensor>& attn_mask,
                                               int64_t appended_keys) {
  const auto dtype = args.query.scalar_type();
  std::optional<at::Tensor> merged;
  if (given(attn_mask)) {
    auto mask = additive(*attn_mask, dtype);
    // (L, S) -> (1, 1, L, S); (N * H, L, S) -> (N, H, L, S).
    merged =
        mask.dim() == 2 ? mask.unsqueeze(0).unsqueeze(0) : mask.unflatten(0, {-1, args.num_heads});
  }
  if (given(args.key_padding_mask)) {
    auto mask = additive(*args.key_padding_mask, dtype);
    // (N, S) or unbatched (S) -> (N, 1, 1, S).
    mask = args.is_batched() ? mask.unsqueeze(1).unsqueeze(1) : mask.view({1, 1, 1, -1});
    merged = merged ? *merged + mask : mask;
  }
  if (merged && appended_keys > 0) {
    // bias_k and the zero key are appended after the given keys and are always visible.
    merged = at::constant_pad_nd(*merged, {0, appended_keys}, 0);
  }
  return merged;
}

}  // namespace torchmha::composite
