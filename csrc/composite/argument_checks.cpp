// Every argument check of the op, with messages that name the argument and its shape.
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>

#include "arguments.h"
#include "attention.h"
#include "decimal.h"

namespace torchmha::composite {
namespace {

constexpr const char* kOp = "torchmha.multi_head_attention: ";

// The packed projection has 3 * embed_dim rows: a larger embed_dim would overflow int64 there.
constexpr int64_t kMaxEmbedDim = std::numeric_limits<int64_t>::max() / 3;

bool has_shape(const at::Tensor& tensor, std::initializer_list<c10::SymInt> shape) {
  if (tensor.dim() != static_cast<int64_t>(shape.size())) {
    return false;
  }
  int64_t dim = 0;
  for (const auto& size : shape) {
    if (tensor.sym_size(dim++) != size) {
      return false;
    }
  }
  return true;
}

// Sparse and nested tensors have no fixed (L, N, E) sizes to check; refuse them by name.
void check_dense(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(!tensor.is_nested() && tensor.layout() == at::kStrided, kOp, "expected a dense `",
              name, "`, but got a ",
              tensor.is_nested() ? std::string("nested") : c10::str(tensor.layout()), " tensor");
}

// An undefined C++ tensor reads as shape [0]; say that it is undefined instead.
void check_defined(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.defined(), kOp, "expected a defined `", name,
              "`, but got an undefined tensor");
}

// A weight or bias: dense, with the dtype and device of `query`.
void check_dense_like_query(const at::Tensor& query, const at::Tensor& tensor, const char* name) {
  check_dense(tensor, name);
  TORCH_CHECK(tensor.scalar_type() == query.scalar_type(), kOp, "expected `", name,
              "` to have the dtype of `query` (", query.scalar_type(), "), but got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.device() == query.device(), kOp, "expected `", name,
              "` on the device of `query` (", query.device(), "), but got ", tensor.device());
}

void check_mask_dtype(const at::Tensor& query, const at::Tensor& mask, const char* name) {
  TORCH_CHECK(mask.scalar_type() == at::kBool || at::isFloatingType(mask.scalar_type()), kOp,
              "only bool and floating types of `", name, "` are supported, but got ",
              mask.scalar_type());
  TORCH_CHECK(mask.device() == query.device(), kOp, "expected `", name,
              "` on the device of `query` (", query.device(), "), but got ", mask.device());
  check_dense(mask, name);
}

void check_ranks(const Arguments& args) {
  const auto& query = args.query;
  check_defined(query, "query");
  check_defined(args.key, "key");
  check_defined(args.value, "value");
  check_dense(query, "query");
  check_dense(args.key, "key");
  check_dense(args.value, "value");
  TORCH_CHECK(query.dim() == 2 || query.dim() == 3, kOp,
              "expected `query` to be 2-D (unbatched) or 3-D (batched), but got `query` of shape ",
              query.sym_sizes());
  TORCH_CHECK(args.key.dim() == query.dim() && args.value.dim() == query.dim(), kOp,
              "expected `key` and `value` to be ", query.dim(), "-D like `query` ",
              query.sym_sizes(), ", but got `key` of shape ", args.key.sym_sizes(),
              " and `value` of shape ", args.value.sym_sizes());
  TORCH_CHECK(at::isFloatingType(query.scalar_type()), kOp,
              "expected a floating point `query`, but got ", query.scalar_type());
}

// embed_dim is the module's: out_proj_weight is (embed_dim, embed_dim), and query must match it.
void check_embed_dim(const Arguments& args) {
  // Symbolic sizes cannot overflow, and comparing them would add a guard: check concrete ones.
  const auto embed_dim = args.query.sym_size(-1).maybe_as_int();
  TORCH_CHECK_VALUE(!embed_dim || *embed_dim <= kMaxEmbedDim, kOp, "embed_dim ", *embed_dim,
                    " (the last dimension of `query` ", args.query.sym_sizes(),
                    ") is too large: 3 * embed_dim must fit in int64, so embed_dim must be at "
                    "most ",
                    kMaxEmbedDim);
  const auto& weight = args.out_proj_weight;
  check_defined(weight, "out_proj_weight");
  check_dense(weight, "out_proj_weight");
  TORCH_CHECK(weight.dim() == 2 && weight.sym_size(0) == weight.sym_size(1), kOp,
              "expected a square `out_proj_weight` [embed_dim, embed_dim], but got ",
              weight.sym_sizes());
  TORCH_CHECK(args.query.sym_size(-1) == weight.sym_size(0), kOp,
              "expected `query` with embed_dim ", weight.sym_size(0),
              " (the size of `out_proj_weight`) as its last dimension, but got "
              "`query` of shape ",
              args.query.sym_sizes());
}

void check_heads_and_lengths(const Arguments& args) {
  const auto& query = args.query;
  TORCH_CHECK_VALUE(args.num_heads > 0, kOp, "`num_heads` must be positive, but got ",
                    args.num_heads);
  const c10::SymInt embed_dim = query.sym_size(-1);
  // PyTorch refuses embed_dim 0 too; heads of size 0 would divide the scores by sqrt(0).
  TORCH_CHECK_VALUE(embed_dim > 0, kOp, "embed_dim (the last dimension of `query` ",
                    query.sym_sizes(), ") must be positive");
  TORCH_CHECK_VALUE(embed_dim % args.num_heads == 0, kOp, "embed_dim ", embed_dim,
                    " (the last dimension of `query` ", query.sym_sizes(),
                    ") is not divisible by num_heads ", args.num_heads);
  if (args.is_batched()) {
    const int64_t batch_dim = args.batch_first ? 0 : 1;
    TORCH_CHECK(args.key.sym_size(batch_dim) == query.sym_size(batch_dim) &&
                    args.value.sym_size(batch_dim) == query.sym_size(batch_dim),
                kOp, "expected `query`, `key` and `value` to share the batch size (dim ", batch_dim,
                " with batch_first=", args.batch_first ? "True" : "False", "), but got `query` ",
                query.sym_sizes(), ", `key` ", args.key.sym_sizes(), ", `value` ",
                args.value.sym_sizes());
  }
  const int64_t seq_dim = args.sequence_dim();
  TORCH_CHECK(args.key.sym_size(seq_dim) == args.value.sym_size(seq_dim), kOp,
              "expected `key` and `value` to have the same sequence length, but got `key` ",
              args.key.sym_sizes(), " and `value` ", args.value.sym_sizes());
}

// Where key/value heads are grouped, a shape message says how kv_dim follows from them.
std::string kv_heads_note(const Arguments& args) {
  if (args.group_size() == 1) {
    return "";
  }
  return c10::str(" (kv_dim = num_kv_heads * embed_dim / num_heads = ", args.kv_heads(), " * ",
                  args.query.sym_size(-1), " / ", args.num_heads, ")");
}

// How the message names the key/value projection's features: embed_dim unless grouped.
const char* kv_dim_name(const Arguments& args) {
  return args.group_size() == 1 ? "embed_dim" : "kv_dim";
}

void check_projection_weights(const Arguments& args) {
  const auto& query = args.query;
  const c10::SymInt embed_dim = query.sym_size(-1);
  const c10::SymInt kv_dim = args.kv_dim();
  const c10::SymInt packed_rows = embed_dim + 2 * kv_dim;
  const char* packed_name = args.group_size() == 1 ? "3 * embed_dim" : "embed_dim + 2 * kv_dim";
  const bool any_separate =
      given(args.q_proj_weight) || given(args.k_proj_weight) || given(args.v_proj_weight);
  TORCH_CHECK(args.has_packed_weight() != any_separate, kOp,
              "give either `in_proj_weight` or all of `q_proj_weight`, `k_proj_weight` and "
              "`v_proj_weight`, but got ",
              args.has_packed_weight() ? "both" : "neither");
  if (args.has_packed_weight()) {
    const auto& weight = *args.in_proj_weight;
    check_dense_like_query(query, weight, "in_proj_weight");
    TORCH_CHECK(has_shape(weight, {packed_rows, embed_dim}), kOp,
                "expected `in_proj_weight` of shape [", packed_name, ", embed_dim] = [",
                packed_rows, ", ", embed_dim, "] for `query` of shape ", query.sym_sizes(),
                kv_heads_note(args), ", but got ", weight.sym_sizes());
    TORCH_CHECK(args.key.sym_size(-1) == embed_dim && args.value.sym_size(-1) == embed_dim, kOp,
                "a packed `in_proj_weight` needs `key` and `value` with embed_dim ", embed_dim,
                " like `query`, but got `key` of shape ", args.key.sym_sizes(),
                " and `value` of shape ", args.value.sym_sizes(),
                " (use kdim/vdim, i.e. separate projection weights)");
  } else {
    TORCH_CHECK(given(args.q_proj_weight) && given(args.k_proj_weight) && given(args.v_proj_weight),
                kOp,
                "separate projection weights need all of `q_proj_weight`, `k_proj_weight` and "
                "`v_proj_weight`");
    const std::pair<const at::Tensor*, const char*> weights[] = {
        {&*args.q_proj_weight, "q_proj_weight"},
        {&*args.k_proj_weight, "k_proj_weight"},
        {&*args.v_proj_weight, "v_proj_weight"}};
    const at::Tensor* inputs[] = {&query, &args.key, &args.value};
    const char* input_names[] = {"query", "key", "value"};
    for (int index = 0; index < 3; ++index) {
      const auto& [weight, name] = weights[index];
      check_dense_like_query(query, *weight, name);
      const c10::SymInt input_dim = inputs[index]->sym_size(-1);
      const c10::SymInt rows = index == 0 ? embed_dim : kv_dim;
      TORCH_CHECK(has_shape(*weight, {rows, input_dim}), kOp, "expected `", name, "` of shape [",
                  index == 0 ? "embed_dim" : kv_dim_name(args), ", ", input_names[index],
                  ".size(-1)] = [", rows, ", ", input_dim, "]", kv_heads_note(args), ", but got ",
                  weight->sym_sizes());
    }
  }
  check_dense_like_query(query, args.key, "key");
  check_dense_like_query(query, args.value, "value");
  if (given(args.in_proj_bias)) {
    check_dense_like_query(query, *args.in_proj_bias, "in_proj_bias");
    TORCH_CHECK(has_shape(*args.in_proj_bias, {packed_rows}), kOp,
                "expected `in_proj_bias` of shape [", packed_name, "] = [", packed_rows, "]",
                kv_heads_note(args), ", but got ", args.in_proj_bias->sym_sizes());
  }
  check_dense_like_query(query, args.out_proj_weight, "out_proj_weight");
  if (given(args.out_proj_bias)) {
    check_dense_like_query(query, *args.out_proj_bias, "out_proj_bias");
    TORCH_CHECK(has_shape(*args.out_proj_bias, {embed_dim}), kOp,
                "expected `out_proj_bias` of shape [embed_dim] = [", embed_dim, "], but got ",
                args.out_proj_bias->sym_sizes());
  }
}

void check_bias_kv(const Arguments& args) {
  TORCH_CHECK(given(args.bias_k) == given(args.bias_v), kOp,
              "`bias_k` and `bias_v` go together, but only `",
              given(args.bias_k) ? "bias_k" : "bias_v", "` was given");
  if (!given(args.bias_k)) {
    return;
  }
  const c10::SymInt kv_dim = args.kv_dim();
  for (const auto& [bias, name] : {std::pair{&*args.bias_k, "bias_k"}, {&*args.bias_v, "bias_v"}}) {
    check_dense_like_query(args.query, *bias, name);
    // [E], [1, E] and [1, 1, E] as in PyTorch; a [2, E / 2] bias would be reshaped silently.
    TORCH_CHECK(bias->dim() >= 1 && bias->dim() <= 3 && bias->sym_size(-1) == kv_dim &&
                    bias->sym_numel() == kv_dim,
                kOp, "expected `", name, "` of shape [1, 1, ", kv_dim_name(args), "] = [1, 1, ",
                kv_dim, "]", kv_heads_note(args), ", but got ", bias->sym_sizes());
  }
}

void check_kv_heads(const Arguments& args) {
  if (!args.num_kv_heads) {
    return;
  }
  const int64_t kv_heads = *args.num_kv_heads;
  TORCH_CHECK_VALUE(kv_heads > 0 && kv_heads <= args.num_heads && args.num_heads % kv_heads == 0,
                    kOp, "`num_kv_heads` must divide num_heads ", args.num_heads,
                    " (1 <= num_kv_heads <= num_heads), but got ", kv_heads);
}

void check_rotary(const Arguments& args) {
  if (!args.has_rotary()) {
    TORCH_CHECK_VALUE(!args.rotary_dim && !args.rotary_interleaved, kOp, "`",
                      args.rotary_dim ? "rotary_dim" : "rotary_interleaved",
                      "` applies to rotary embeddings, which need `rope_theta`");
    TORCH_CHECK(!given(args.positions), kOp,
                "`positions` places rotary embeddings, which need `rope_theta`");
    return;
  }
  const double theta = *args.rope_theta;
  TORCH_CHECK_VALUE(std::isfinite(theta) && theta > 0.0, kOp,
                    "`rope_theta` must be positive and finite, but got ", shortest_decimal(theta));
  // A concrete head size: the rotation's split depends on it (guards on a traced embed_dim).
  const int64_t head_dim = (args.query.sym_size(-1) / args.num_heads).guard_int(__FILE__, __LINE__);
  if (args.rotary_dim) {
    const int64_t rotary_dim = *args.rotary_dim;
    TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim, kOp,
                      "`rotary_dim` must be even and in [2, head_dim] = [2, ", head_dim,
                      "], but got ", rotary_dim);
  } else {
    TORCH_CHECK_VALUE(head_dim % 2 == 0, kOp,
                      "rotary embeddings rotate pairs of features, but "
                      "head_dim ",
                      head_dim, " is odd: give an even `rotary_dim`");
  }
  if (!given(args.positions)) {
    return;
  }
  const auto& positions = *args.positions;
  check_dense(positions, "positions");
  TORCH_CHECK(!at::isFloatingType(positions.scalar_type()) &&
                  !at::isComplexType(positions.scalar_type()) &&
                  positions.scalar_type() != at::kBool,
              kOp, "expected integer `positions`, but got ", positions.scalar_type());
  TORCH_CHECK(positions.device() == args.query.device(), kOp,
              "expected `positions` on the device of `query` (", args.query.device(), "), but got ",
              positions.device());
  const int64_t seq_dim = args.sequence_dim();
  const c10::SymInt target_len = args.query.sym_size(seq_dim);
  const bool batched = args.is_batched();
  if (batched) {
    const c10::SymInt batch = args.query.sym_size(args.batch_first ? 0 : 1);
    TORCH_CHECK(has_shape(positions, {target_len}) || has_shape(positions, {batch, target_len}),
                kOp, "expected `positions` of shape [L] = [", target_len, "] or [batch, L] = [",
                batch, ", ", target_len, "], but got ", positions.sym_sizes());
  } else {
    TORCH_CHECK(has_shape(positions, {target_len}), kOp, "expected `positions` of shape [L] = [",
                target_len, "] for unbatched `query`, but got ", positions.sym_sizes());
  }
  TORCH_CHECK(args.key.sym_size(seq_dim) == target_len, kOp,
              "`positions` gives the query tokens' positions, which the keys share, so `key` needs "
              "the query's length ",
              target_len, ", but got `key` of shape ", args.key.sym_sizes());
  // Reading the values synchronises and cannot be traced: checked on real tensors only.
  if (is_concrete(positions) && positions.numel() > 0) {
    TORCH_CHECK(positions.min().item<int64_t>() >= 0, kOp,
                "`positions` must be non-negative, but got ", positions.min().item<int64_t>());
  }
}

void check_masks(const Arguments& args) {
  const auto& query = args.query;
  const bool batched = args.is_batched();
  const int64_t seq_dim = args.sequence_dim();
  const c10::SymInt target_len = query.sym_size(seq_dim);
  const c10::SymInt source_len = args.key.sym_size(seq_dim);
  const c10::SymInt batch = batched ? query.sym_size(args.batch_first ? 0 : 1) : c10::SymInt(1);
  if (given(args.key_padding_mask)) {
    const auto& mask = *args.key_padding_mask;
    check_mask_dtype(query, mask, "key_padding_mask");
    if (batched) {
      TORCH_CHECK(has_shape(mask, {batch, source_len}), kOp,
                  "expected `key_padding_mask` of shape [batch, source length] = [", batch, ", ",
                  source_len, "], but got ", mask.sym_sizes());
    } else {
      TORCH_CHECK(has_shape(mask, {source_len}), kOp,
                  "expected `key_padding_mask` of shape [source length] = [", source_len,
                  "] for unbatched `query`, but got ", mask.sym_sizes());
    }
  }
  if (given(args.attn_mask)) {
    const auto& mask = *args.attn_mask;
    check_mask_dtype(query, mask, "attn_mask");
    const c10::SymInt groups = batch * args.num_heads;
    TORCH_CHECK(has_shape(mask, {target_len, source_len}) ||
                    has_shape(mask, {groups, target_len, source_len}),
                kOp, "expected `attn_mask` of shape [L, S] = [", target_len, ", ", source_len,
                "] or [", batched ? "batch * num_heads" : "num_heads", ", L, S] = [", groups, ", ",
                target_len, ", ", source_len, "], but got ", mask.sym_sizes());
  }
}

}  // namespace

void check_arguments(const Arguments& args) {
  check_ranks(args);
  check_embed_dim(args);
  check_heads_and_lengths(args);
  check_kv_heads(args);
  check_rotary(args);
  check_projection_weights(args);
  check_bias_kv(args);
  check_masks(args);
  TORCH_CHECK_VALUE(args.dropout_p >= 0.0 && args.dropout_p <= 1.0, kOp,
                    "`dropout_p` must be in [0, 1], but got ", shortest_decimal(args.dropout_p));
}

}  // namespace torchmha::composite
