#include "rotary.h"

#include <ATen/ATen.h>

namespace torchmha::composite {
namespace {

int64_t rotary_dim_of(const Arguments& args) {
  if (args.rotary_dim) {
    return *args.rotary_dim;
  }
  return (args.query.sym_size(-1) / args.num_heads).guard_int(__FILE__, __LINE__);
}

}  // namespace

RotaryTables rotary_tables(const Arguments& args, const std::optional<at::Tensor>& positions,
                           const c10::SymInt& length, at::ScalarType dtype) {
  const int64_t rotary_dim = rotary_dim_of(args);
  // float32 angles as PyTorch's rotary implementations compute them; float64 keeps float64 exact.
  const auto table_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = args.query.options().dtype(table_dtype);
  // theta^(-2i / rotary_dim) for i < rotary_dim / 2, in float64 before rounding to table_dtype.
  const auto exponents =
      at::arange(0, rotary_dim, 2, options.dtype(at::kDouble)) / static_cast<double>(rotary_dim);
  const auto inverse_frequencies = at::pow(*args.rope_theta, -exponents).to(table_dtype);
  at::Tensor at_positions;
  if (given(positions)) {
    at_positions = positions->to(table_dtype);
    // (L) -> (1, L); (N, L) stays: then (N or 1, 1, L, 1) against (rotary_dim / 2).
    if (at_positions.dim() == 1) {
      at_positions = at_positions.unsqueeze(0);
    }
  } else {
    at_positions = at::arange(c10::Scalar(length), options).unsqueeze(0);
  }
  const auto angles = at_positions.unsqueeze(1).unsqueeze(-1) * inverse_frequencies;
  return {angles.cos().to(dtype), angles.sin().to(dtype)};
}

at::Tensor rotate(const at::Tensor& heads, const RotaryTables& tables, const Arguments& args) {
  const int64_t rotary_dim = rotary_dim_of(args);
  const int64_t head_dim = heads.sym_size(-1).guard_int(__FILE__, __LINE__);
  const int64_t half = rotary_dim / 2;
  // Pairs side by side along `pair_dim`: (..., 2, half) for "rotate half" (Llama, GPT-NeoX: i
  // with i + half), (..., half, 2) for interleaved pairs (GPT-J: 2i with 2i + 1).
  const int64_t pair_dim = args.rotary_interleaved ? -1 : -2;
  const auto pairs = heads.narrow(-1, 0, rotary_dim)
                         .unflatten(-1, args.rotary_interleaved ? at::IntArrayRef{half, 2}
                                                                : at::IntArrayRef{2, half});
  const auto cos = tables.cos.unsqueeze(pair_dim);
  const auto signed_sin = at::stack({-tables.sin, tables.sin}, pair_dim);
  // (a, b) -> (a cos - b sin, b cos + a sin): the pairs swapped, times (-sin, sin), plus the
  // pairs times cos. No narrowed halves: the backward allocates no zero-filled gradients.
  auto rotated = at::addcmul(pairs * cos, pairs.flip(pair_dim), signed_sin).flatten(-2);
  if (rotary_dim == head_dim) {
    return rotated;
  }
  return at::cat({rotated, heads.narrow(-1, rotary_dim, head_dim - rotary_dim)}, -1);
}

}  // namespace torchmha::composite
