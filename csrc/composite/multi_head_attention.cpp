// The math of torchmha::multi_head_attention, composed of ATen ops so that autograd,
// autocast, tracing and every device work through decomposition.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "arguments.h"
#include "attention.h"
#include "cache_step.h"
#include "masks.h"
#include "rotary.h"

namespace torchmha::composite {
namespace {

struct Heads {
  at::Tensor query, key, value;  // each (N, H, length, head_dim)
};

// (A, B, H, D) with (A, B) = (N, L) or (L, N) -> (N, H, L, D), a view.
at::Tensor to_attention_layout(const at::Tensor& heads, bool batch_first) {
  return batch_first ? heads.permute({0, 2, 1, 3}) : heads.permute({1, 2, 0, 3});
}

at::Tensor split_heads(const at::Tensor& projected, int64_t num_heads, bool batch_first) {
  return to_attention_layout(projected.unflatten(-1, {num_heads, -1}), batch_first);
}

// (N, H, L, D) -> (N, L, E) or (L, N, E): the concatenation of the heads.
at::Tensor merge_heads(const at::Tensor& attended, bool batch_first) {
  // Batch-first, the output projection wants (N, L, E) contiguous: copied once here if at all.
  return batch_first ? contiguous_in_words(attended.permute({0, 2, 1, 3})).flatten(-2)
                     : attended.permute({2, 0, 1, 3}).flatten(-2);
}

std::optional<at::Tensor> bias_chunk(const Arguments& args, int64_t start, int64_t chunks) {
  if (!given(args.in_proj_bias)) {
    return std::nullopt;
  }
  const c10::SymInt embed_dim = args.query.sym_size(-1);
  return args.in_proj_bias->narrow_symint(0, start * embed_dim, chunks * embed_dim);
}

// (A, B, n, H, D) packed projections -> (n, N, H, L, D) contiguous, in one copy: the weights
// path's batched GEMMs then read q, k and v without copying each again.
std::vector<at::Tensor> contiguous_heads(const at::Tensor& packed, bool batch_first) {
  return contiguous_in_words(batch_first ? packed.permute({2, 0, 3, 1, 4})
                                         : packed.permute({2, 1, 3, 0, 4}))
      .unbind(0);
}

Heads project_packed(const Arguments& args, const at::Tensor& query, const at::Tensor& key,
                     const at::Tensor& value, bool head_major) {
  const bool batch_first = args.is_batch_first();
  const int64_t num_heads = args.num_heads;
  const auto& weight = *args.in_proj_weight;
  const c10::SymInt embed_dim = args.query.sym_size(-1);
  if (args.query.is_same(args.key) && args.key.is_same(args.value)) {
    // Self-attention: one GEMM produces q, k and v side by side.
    // unbind, not three selects: its backward writes one gradient instead of three zero-filled.
    const auto packed =
        at::linear(query, weight, bias_chunk(args, 0, 3)).unflatten(-1, {3, num_heads, -1});
    if (head_major) {
      const auto qkv = contiguous_heads(packed, batch_first);
      return {qkv[0], qkv[1], qkv[2]};
    }
    const auto qkv = packed.unbind(-3);
    return {to_attention_layout(qkv[0], batch_first), to_attention_layout(qkv[1], batch_first),
            to_attention_layout(qkv[2], batch_first)};
  }
  const auto q = at::linear(query, weight.narrow_symint(0, 0, embed_dim), bias_chunk(args, 0, 1));
  if (args.key.is_same(args.value)) {
    // Encoder-decoder attention: one GEMM produces k and v.
    const auto projected_kv =
        at::linear(key, weight.narrow_symint(0, embed_dim, 2 * embed_dim), bias_chunk(args, 1, 2))
            .unflatten(-1, {2, num_heads, -1});
    if (head_major) {
      const auto kv = contiguous_heads(projected_kv, batch_first);
      return {split_heads(q, num_heads, batch_first), kv[0], kv[1]};
    }
    const auto kv = projected_kv.unbind(-3);
    return {split_heads(q, num_heads, batch_first), to_attention_layout(kv[0], batch_first),
            to_attention_layout(kv[1], batch_first)};
  }
  const auto k =
      at::linear(key, weight.narrow_symint(0, embed_dim, embed_dim), bias_chunk(args, 1, 1));
  const auto v =
      at::linear(value, weight.narrow_symint(0, 2 * embed_dim, embed_dim), bias_chunk(args, 2, 1));
  return {split_heads(q, num_heads, batch_first), split_heads(k, num_heads, batch_first),
          split_heads(v, num_heads, batch_first)};
}

Heads project_separate(const Arguments& args, const at::Tensor& query, const at::Tensor& key,
                       const at::Tensor& value) {
  const bool batch_first = args.is_batch_first();
  const auto q = at::linear(query, *args.q_proj_weight, bias_chunk(args, 0, 1));
  const auto k = at::linear(key, *args.k_proj_weight, bias_chunk(args, 1, 1));
  const auto v = at::linear(value, *args.v_proj_weight, bias_chunk(args, 2, 1));
  return {split_heads(q, args.num_heads, batch_first), split_heads(k, args.num_heads, batch_first),
          split_heads(v, args.num_heads, batch_first)};
}

// Grouped heads (or rotary ones): q has embed_dim features, k and v kv_dim each (packed in that
// order).
Heads project_grouped(const Arguments& args, const at::Tensor& query, const at::Tensor& key,
                      const at::Tensor& value) {
  const bool batch_first = args.is_batch_first();
  const c10::SymInt embed_dim = args.query.sym_size(-1);
  const c10::SymInt kv_dim = args.kv_dim();
  const auto bias = [&args](const c10::SymInt& start,
                            const c10::SymInt& length) -> std::optional<at::Tensor> {
    if (!given(args.in_proj_bias)) {
      return std::nullopt;
    }
    return args.in_proj_bias->narrow_symint(0, start, length);
  };
  at::Tensor q, k, v;
  if (!args.has_packed_weight()) {
    q = at::linear(query, *args.q_proj_weight, bias(0, embed_dim));
    k = at::linear(key, *args.k_proj_weight, bias(embed_dim, kv_dim));
    v = at::linear(value, *args.v_proj_weight, bias(embed_dim + kv_dim, kv_dim));
  } else if (args.query.is_same(args.key) && args.key.is_same(args.value) && args.has_rotary()) {
    // Self-attention with rotary embeddings: q and k from one GEMM, v from its own, so the
    // unrotated q and k die with the rotation instead of living on in a packed q, k, v output.
    const auto& weight = *args.in_proj_weight;
    const auto packed = at::linear(query, weight.narrow_symint(0, 0, embed_dim + kv_dim),
                                   bias(0, embed_dim + kv_dim));
    q = packed.narrow_symint(-1, 0, embed_dim);
    k = packed.narrow_symint(-1, embed_dim, kv_dim);
    v = at::linear(value, weight.narrow_symint(0, embed_dim + kv_dim, kv_dim),
                   bias(embed_dim + kv_dim, kv_dim));
  } else if (args.query.is_same(args.key) && args.key.is_same(args.value)) {
    // Self-attention: one GEMM produces q, k and v side by side.
    const auto packed = at::linear(query, *args.in_proj_weight, bias(0, embed_dim + 2 * kv_dim));
    q = packed.narrow_symint(-1, 0, embed_dim);
    k = packed.narrow_symint(-1, embed_dim, kv_dim);
    v = packed.narrow_symint(-1, embed_dim + kv_dim, kv_dim);
  } else {
    const auto& weight = *args.in_proj_weight;
    q = at::linear(query, weight.narrow_symint(0, 0, embed_dim), bias(0, embed_dim));
    if (args.key.is_same(args.value)) {
      // Encoder-decoder attention: one GEMM produces k and v.
      const auto kv = at::linear(key, weight.narrow_symint(0, embed_dim, 2 * kv_dim),
                                 bias(embed_dim, 2 * kv_dim));
      k = kv.narrow_symint(-1, 0, kv_dim);
      v = kv.narrow_symint(-1, kv_dim, kv_dim);
    } else {
      k = at::linear(key, weight.narrow_symint(0, embed_dim, kv_dim), bias(embed_dim, kv_dim));
      v = at::linear(value, weight.narrow_symint(0, embed_dim + kv_dim, kv_dim),
                     bias(embed_dim + kv_dim, kv_dim));
    }
  }
  const int64_t kv_heads = args.kv_heads();
  return {split_heads(q, args.num_heads, batch_first), split_heads(k, kv_heads, batch_first),
          split_heads(v, kv_heads, batch_first)};
}

// Rotary embeddings on the queries and keys; the keys share the queries' table when they share
// their positions (given positions, or self-attention).
void rotate_heads(const Arguments& args, Heads& heads) {
  const auto dtype = heads.query.scalar_type();
  const auto query_tables = rotary_tables(args, args.positions, heads.query.sym_size(2), dtype);
  heads.query = rotate(heads.query, query_tables, args);
  if (given(args.positions) || args.query.is_same(args.key)) {
    heads.key = rotate(heads.key, query_tables, args);
  } else {
    heads.key =
        rotate(heads.key, rotary_tables(args, std::nullopt, heads.key.sym_size(2), dtype), args);
  }
}

// (N, Hkv, S, D) -> (N, Hkv * group, S, D): each key/value head repeated for its query heads.
at::Tensor repeat_kv_heads(const at::Tensor& heads, int64_t group) {
  const auto sizes = heads.sym_sizes();
  return heads.unsqueeze(2)
      .expand_symint({sizes[0], sizes[1], group, sizes[2], sizes[3]})
      .flatten(1, 2);
}

// Whether at::scaled_dot_product_attention computes grouped heads without repeating them in
// memory: the CPU's flash kernel takes them with any mask; on CUDA the flash kernel takes them,
// but with a mask SDPA would fall back to its math kernel, which repeats them anyway.
bool sdpa_takes_grouped_heads(const at::Tensor& query, const std::optional<at::Tensor>& mask) {
  return query.device().is_cpu() || (query.device().is_cuda() && !mask);
}

// (1, 1, E) learned bias -> one more key/value position for every batch entry.
at::Tensor append_bias(const at::Tensor& heads, const at::Tensor& bias, int64_t num_heads) {
  const std::array<c10::SymInt, 4> shape{heads.sym_size(0), -1, -1, -1};
  return at::cat({heads, bias.reshape({1, num_heads, 1, -1}).expand_symint(shape)}, 2);
}

// A head's keys spanning more bytes than this in the packed projection are copied head-major
// for the CPU's blocks: there their GEMMs slowed by more than the copy costs (TLB and cache
// reach; scripts/bench/NOTES.md has the figures).
constexpr int64_t kMaxKeySpanReadInPlace = int64_t{8} << 20;

// Whether the weights path reads q, k and v as views of the packed projection instead of one
// head-major copy: where the CPU's blocks take them (each head's GEMMs read strided rows as they
// are) and a head's keys lie close enough together. The batched GEMMs of every other weights
// path want each head contiguous.
bool weights_read_projection_in_place(const Arguments& args, const std::optional<at::Tensor>& mask,
                                      int64_t appended_keys, double dropout_p) {
  if (!args.need_weights || !is_concrete(args.query) || !is_concrete(args.key)) {
    return false;
  }
  const int64_t seq_dim = args.sequence_dim();
  const int64_t batch = args.is_batched() ? args.query.size(1 - seq_dim) : 1;
  const int64_t target_len = args.query.size(seq_dim);
  const int64_t source_len = args.key.size(seq_dim) + appended_keys;
  if (!weights_in_cpu_blocks(args.query, batch * args.num_heads * target_len * source_len,
                             dropout_p, mask)) {
    return false;
  }
  // One key row to the next: a projection row (q, k and v side by side when packed), times the
  // batch when the sequence comes first.
  const int64_t embed_dim = args.query.size(-1);
  const int64_t packed_rows = args.query.is_same(args.key) && args.key.is_same(args.value) ? 3
                              : args.key.is_same(args.value)                               ? 2
                                                                                           : 1;
  const auto element_size = static_cast<int64_t>(c10::elementSize(gemm_dtype(args.query)));
  const int64_t row_bytes =
      packed_rows * embed_dim * (args.is_batch_first() ? 1 : batch) * element_size;
  return source_len * row_bytes <= kMaxKeySpanReadInPlace;
}

// Unbatched inputs gain a batch of one in front (and are then batch-first).
at::Tensor as_batched(const Arguments& args, const at::Tensor& tensor) {
  return args.is_batched() ? tensor : tensor.unsqueeze(0);
}

// The heads' concatenation and the output projection, in the inputs' layout.
at::Tensor project_output(const Arguments& args, const at::Tensor& attended) {
  auto output = at::linear(merge_heads(attended, args.is_batch_first()), args.out_proj_weight,
                           args.out_proj_bias);
  return args.is_batched() ? output : output.squeeze(0);
}

// Attention of the projected heads, the heads' concatenation and the output projection.
// `causal_hint`: SDPA's causal flag stands in for a mask (only where `mask` has none).
std::tuple<at::Tensor, at::Tensor> attend_and_project(const Arguments& args, const Heads& heads,
                                                      std::optional<at::Tensor> mask,
                                                      bool causal_hint) {
  const double dropout = args.training ? args.dropout_p : 0.0;
  const int64_t group = args.group_size();
  // Only the fused path on a device whose SDPA takes grouped heads keeps them unrepeated.
  const bool grouped_sdpa =
      group > 1 && !args.need_weights && sdpa_takes_grouped_heads(args.query, mask);
  auto key = heads.key;
  auto value = heads.value;
  if (group > 1 && !grouped_sdpa) {
    key = repeat_kv_heads(key, group);
    value = repeat_kv_heads(value, group);
  }
  at::Tensor attended;
  at::Tensor weights;
  if (args.need_weights) {
    std::tie(attended, weights) = attention_with_weights(heads.query, key, value, std::move(mask),
                                                         dropout, args.average_attn_weights);
    if (!args.is_batched()) {
      weights = weights.squeeze(0);
    }
  } else {
    attended = fused_attention(heads.query, key, value, std::move(mask), dropout, causal_hint,
                               grouped_sdpa);
    weights = at::empty({0}, args.query.options());
  }
  return {project_output(args, attended), weights};
}

// A decoding step: the new tokens' keys and values go into the cache at each entry's length (after
// the rotation, at the positions that length gives), then the queries attend over the cache.
std::tuple<at::Tensor, at::Tensor> multi_head_attention_with_cache(const Arguments& args) {
  const auto step = plan_cache_step(args);
  Heads heads = project_grouped(args, as_batched(args, args.query), as_batched(args, args.key),
                                as_batched(args, args.value));
  if (args.has_rotary()) {
    const auto tables =
        rotary_tables(args, step.positions, heads.query.sym_size(2), heads.query.scalar_type());
    heads.query = rotate(heads.query, tables, args);
    heads.key = rotate(heads.key, tables, args);
  }
  // Every check passed before this point: only now is the caller's cache written.
  write_into_cache(*args.cache_key, heads.key, step);
  write_into_cache(*args.cache_value, heads.value, step);
  args.cache_lengths->copy_(step.new_lengths);
  heads.key = *args.cache_key;
  heads.value = *args.cache_value;
  const double dropout = args.training ? args.dropout_p : 0.0;
  if (attends_few_over_cache(args, dropout)) {
    const auto attended = attend_few_over_cache(heads.query, heads.key, heads.value, step.mask);
    return {project_output(args, attended), at::empty({0}, args.query.options())};
  }
  return attend_and_project(args, heads, step.mask, /*causal_hint=*/false);
}

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
  const Arguments args{query,
                       key,
                       value,
                       num_heads,
                       in_proj_weight,
                       in_proj_bias,
                       q_proj_weight,
                       k_proj_weight,
                       v_proj_weight,
                       out_proj_weight,
                       out_proj_bias,
                       bias_k,
                       bias_v,
                       add_zero_attn,
                       dropout_p,
                       training,
                       key_padding_mask,
                       attn_mask,
                       need_weights,
                       average_attn_weights,
                       is_causal,
                       batch_first,
                       num_kv_heads,
                       rope_theta,
                       rotary_dim,
                       rotary_interleaved,
                       positions,
                       cache_key,
                       cache_value,
                       cache_lengths};
  check_arguments(args);
  if (args.has_cache()) {
    return multi_head_attention_with_cache(args);
  }

  const int64_t appended_keys = (given(bias_k) ? 1 : 0) + (add_zero_attn ? 1 : 0);

  // PyTorch's rule: the causal hint replaces a given mask unless padding or weights need the
  // mask. Without a mask, appended keys (bias_k, zero key) stay visible to every query, as they
  // are when the causal mask is given and padded, so SDPA's flag only serves when none is appended.
  const bool use_causal_hint = is_causal && !given(key_padding_mask) && !need_weights &&
                               (given(attn_mask) || appended_keys == 0);
  std::optional<at::Tensor> effective_attn_mask = attn_mask;
  if (use_causal_hint) {
    effective_attn_mask = std::nullopt;
  } else if (is_causal && !given(attn_mask)) {
    // is_causal without a mask means causal attention (PyTorch would demand a mask).
    const int64_t seq_dim = args.sequence_dim();
    effective_attn_mask =
        causal_mask(query.sym_size(seq_dim), key.sym_size(seq_dim), query.options());
  }
  auto mask = merged_additive_mask(args, effective_attn_mask, appended_keys);
  const double dropout = training ? dropout_p : 0.0;

  const int64_t group = args.group_size();
  // SDPA takes the projections' strided views as they are; so do the CPU's blocks, mostly.
  // Rotated and repeated heads are new tensors, laid out head-major already.
  const bool head_major = need_weights && group == 1 && !args.has_rotary() &&
                          !weights_read_projection_in_place(args, mask, appended_keys, dropout);
  const auto batched_query = as_batched(args, query);
  const auto batched_key = as_batched(args, key);
  const auto batched_value = as_batched(args, value);
  Heads heads = group > 1 || args.has_rotary()
                    ? project_grouped(args, batched_query, batched_key, batched_value)
                : args.has_packed_weight()
                    ? project_packed(args, batched_query, batched_key, batched_value, head_major)
                    : project_separate(args, batched_query, batched_key, batched_value);
  if (args.has_rotary()) {
    rotate_heads(args, heads);
  }
  if (given(bias_k)) {
    heads.key = append_bias(heads.key, *bias_k, args.kv_heads());
    heads.value = append_bias(heads.value, *bias_v, args.kv_heads());
  }
  if (add_zero_attn) {
    // One all-zero key and value position, appended along the sequence.
    heads.key = at::constant_pad_nd(heads.key, {0, 0, 0, 1}, 0);
    heads.value = at::constant_pad_nd(heads.value, {0, 0, 0, 1}, 0);
  }

  return attend_and_project(args, heads, std::move(mask), use_causal_hint);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmha, CompositeImplicitAutograd, m) {
  m.impl("multi_head_attention", &multi_head_attention);
}

// Under vmap the same composition runs once on the batched tensors, as PyTorch's module does,
// instead of functorch's fallback calling the op per sample: the fallback loses vmap's randomness
// modes (dropout would differ between samples under randomness="same", and never raise under
// "error").
TORCH_LIBRARY_IMPL(torchmha, FuncTorchBatchedDecomposition, m) {
  m.impl("multi_head_attention", &multi_head_attention);
}

}  // namespace torchmha::composite
