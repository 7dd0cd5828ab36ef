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
  const auto rotating = heads.narrow(-1, 0, rotary_dim);
  at::Tensor first, second;
  if (args.rotary_interleaved) {
    // Features 2i and 2i + 1 pair up (GPT-J, the original paper).
    const auto pairs = rotating.unflatten(-1, {half, 2});
    first = pairs.select(-1, 0);
    second = pairs.select(-1, 1);
  } else {
    // Feature i pairs with i + rotary_dim / 2 ("rotate half": Llama, GPT-NeoX).
    first = rotating.narrow(-1, 0, half);
    second = rotating.narrow(-1, half, half);
  }
  const auto& cos = tables.cos;
  const auto& sin = tables.sin;
  const auto rotated_first = first * cos - second * sin;
  const auto rotated_second = second * cos + first * sin;
  auto rotated = args.rotary_interleaved
                     ? at::stack({rotated_first, rotated_second}, -1).flatten(-2)
                     : at::cat({rotated_first, rotated_second}, -1);
  if (rotary_dim == head_dim) {
    return rotated;
  }
  return at::cat({rotated, heads.narrow(-1, rotary_dim, head_dim - rotary_dim)}, -1);
}

}  // namespace torchmha::composite
