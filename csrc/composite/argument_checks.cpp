// Every argument check of the op, with messages that name the argument and its shape.
#include <ATen/ops/_assert_async.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>

#include "arguments.h"
#include "attention.h"
#include "decimal.h"
#include "stream_capture.h"

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

// A tensor's values may be copied to the host: it is real (not traced) and its device's stream
// is not being captured into a graph, where such a copy is refused.
bool values_readable_on_host(const at::Tensor& tensor) {
  return is_concrete(tensor) && !is_stream_capturing(tensor.device());
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
  // Reading the values synchronises and cannot be traced or captured: real tensors only.
  if (values_readable_on_host(positions) && positions.numel() > 0) {
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

// What a cache cannot honour, refused by name: it holds the new tokens' own keys, at positions
// that follow its lengths.
void check_cache_combinations(const Arguments& args) {
  const auto refuse_with_cache = [](bool present, const char* name, const char* why) {
    TORCH_CHECK(!present, kOp, "`", name, "` cannot be used with a key/value cache: ", why);
  };
  refuse_with_cache(given(args.bias_k), "bias_k", "its appended key would be cached at every step");
  refuse_with_cache(args.add_zero_attn, "add_zero_attn",
                    "its appended key would be cached at every step");
  refuse_with_cache(given(args.attn_mask), "attn_mask",
                    "the cache builds the mask from `cache_lengths` and `is_causal`");
  refuse_with_cache(given(args.positions), "positions",
                    "the new tokens' positions follow `cache_lengths`");
  // A self-attention cache (causal or rotary) stores the queries' own tokens; without both, a
  // cache may take keys of any length, e.g. a cross-attention memory once, then none.
  if (args.is_causal || args.has_rotary()) {
    const int64_t seq_dim = args.sequence_dim();
    TORCH_CHECK(args.key.sym_size(seq_dim) == args.query.sym_size(seq_dim), kOp,
                "with a key/value cache and ", args.is_causal ? "is_causal" : "rotary embeddings",
                ", `key` and `value` are the new tokens of self-attention (the length of `query` ",
                args.query.sym_sizes(), "), but got `key` of shape ", args.key.sym_sizes(),
                " (a cross-attention cache runs without is_causal and rotary embeddings)");
  }
  if (given(args.key_padding_mask)) {
    TORCH_CHECK(args.key_padding_mask->scalar_type() == at::kBool, kOp,
                "with a key/value cache, `key_padding_mask` marks right padding of the new tokens "
                "and must be bool, but got ",
                args.key_padding_mask->scalar_type());
  }
}

// A cache is for inference: written in place, it cannot be part of an autograd graph.
void check_cache_without_grad(const Arguments& args) {
  if (!c10::GradMode::is_enabled()) {
    return;
  }
  const std::pair<const std::optional<at::Tensor>*, const char*> optional_tensors[] = {
      {&args.in_proj_weight, "in_proj_weight"}, {&args.in_proj_bias, "in_proj_bias"},
      {&args.q_proj_weight, "q_proj_weight"},   {&args.k_proj_weight, "k_proj_weight"},
      {&args.v_proj_weight, "v_proj_weight"},   {&args.out_proj_bias, "out_proj_bias"},
      {&args.cache_key, "cache_key"},           {&args.cache_value, "cache_value"}};
  const char* needing_grad = args.query.requires_grad()             ? "query"
                             : args.key.requires_grad()             ? "key"
                             : args.value.requires_grad()           ? "value"
                             : args.out_proj_weight.requires_grad() ? "out_proj_weight"
                                                                    : nullptr;
  for (const auto& [tensor, name] : optional_tensors) {
    if (needing_grad == nullptr && given(*tensor) && (*tensor)->requires_grad()) {
      needing_grad = name;
    }
  }
  TORCH_CHECK(needing_grad == nullptr, kOp, "a key/value cache is for inference, but `",
              needing_grad,
              "` requires grad: run the step under torch.no_grad() or torch.inference_mode()");
}

// Traced steps (compile, export) and steps captured into a CUDA graph cannot read the lengths:
// the graph checks them when it runs, before the step's writes.
void assert_cache_lengths_in_graph(const Arguments& args) {
  const auto& lengths = *args.cache_lengths;
  const c10::SymInt source_len = args.key.sym_size(args.sequence_dim());
  const c10::SymInt max_seq_len = args.cache_key->sym_size(2);
  const auto fits =
      lengths.ge(0)
          .logical_and(lengths.add(c10::Scalar(source_len)).le(c10::Scalar(max_seq_len)))
          .all();
  at::_assert_async(fits,
                    "torchmha.multi_head_attention: the step would pass max_seq_len "
                    "(`cache_key`'s dim 2) or `cache_lengths` is negative for an entry");
}

void check_cache_lengths_values(const Arguments& args) {
  const auto& lengths = *args.cache_lengths;
  if (lengths.is_meta()) {
    return;  // meta tensors have no values to read
  }
  // The data of the lengths and the padding, read on the host where that is allowed.
  if (!values_readable_on_host(lengths) || !is_concrete(args.query) ||
      !is_concrete(*args.cache_key)) {
    assert_cache_lengths_in_graph(args);
    return;
  }
  if (lengths.numel() == 0) {
    return;
  }
  // The new keys are written, padding included, so all of them must fit.
  const int64_t source_len = args.key.size(args.sequence_dim());
  const int64_t max_seq_len = args.cache_key->size(2);
  const auto lengths_cpu = lengths.cpu().contiguous();
  const auto* values = lengths_cpu.data_ptr<int64_t>();
  for (int64_t entry = 0; entry < lengths_cpu.numel(); ++entry) {
    TORCH_CHECK(values[entry] >= 0, kOp, "`cache_lengths` must be non-negative, but entry ", entry,
                " has length ", values[entry]);
    TORCH_CHECK(values[entry] + source_len <= max_seq_len, kOp, "the step would pass max_seq_len ",
                max_seq_len, " (`cache_key` ", args.cache_key->sizes(), "): entry ", entry,
                " at length ", values[entry], " with ", source_len, " new tokens needs ",
                values[entry] + source_len - max_seq_len, " more positions");
  }
  if (source_len > 1 && given(args.key_padding_mask) && is_concrete(*args.key_padding_mask) &&
      !args.key_padding_mask->is_meta()) {
    const auto padding = args.key_padding_mask->reshape({-1, source_len}).to(at::kLong);
    // Right padding: once a token is padding, every later one is too.
    const auto holes =
        padding.narrow(1, 0, source_len - 1).gt(padding.narrow(1, 1, source_len - 1));
    TORCH_CHECK(!holes.any().item<bool>(), kOp,
                "with a key/value cache, `key_padding_mask` must be right padding (real tokens "
                "first, then padding), but a real token follows a padded one");
  }
}

void check_cache(const Arguments& args) {
  const bool any_given =
      given(args.cache_key) || given(args.cache_value) || given(args.cache_lengths);
  if (!any_given) {
    return;
  }
  TORCH_CHECK(given(args.cache_key) && given(args.cache_value) && given(args.cache_lengths), kOp,
              "a key/value cache is `cache_key`, `cache_value` and `cache_lengths` together, but "
              "`",
              !given(args.cache_key)     ? "cache_key"
              : !given(args.cache_value) ? "cache_value"
                                         : "cache_lengths",
              "` is missing");
  const auto& query = args.query;
  const c10::SymInt batch =
      args.is_batched() ? query.sym_size(args.batch_first ? 0 : 1) : c10::SymInt(1);
  const c10::SymInt head_dim = query.sym_size(-1) / args.num_heads;
  for (const auto& [cache, name] :
       {std::pair{&*args.cache_key, "cache_key"}, {&*args.cache_value, "cache_value"}}) {
    check_dense_like_query(query, *cache, name);
    TORCH_CHECK(cache->dim() == 4 && cache->sym_size(0) == batch &&
                    cache->sym_size(1) == args.kv_heads() && cache->sym_size(3) == head_dim,
                kOp, "expected `", name,
                "` of shape [batch, num_kv_heads, max_seq_len, head_dim] = [", batch, ", ",
                args.kv_heads(), ", max_seq_len, ", head_dim, "], but got ", cache->sym_sizes());
  }
  TORCH_CHECK(args.cache_value->sym_sizes().equals(args.cache_key->sym_sizes()), kOp,
              "expected `cache_value` of the shape of `cache_key` ", args.cache_key->sym_sizes(),
              ", but got ", args.cache_value->sym_sizes());
  TORCH_CHECK(!args.cache_key->is_same(*args.cache_value), kOp,
              "`cache_key` and `cache_value` must be different tensors");
  const auto& lengths = *args.cache_lengths;
  check_dense(lengths, "cache_lengths");
  TORCH_CHECK(lengths.scalar_type() == at::kLong, kOp, "expected int64 `cache_lengths`, but got ",
              lengths.scalar_type());
  TORCH_CHECK(lengths.device() == query.device(), kOp,
              "expected `cache_lengths` on the device of `query` (", query.device(), "), but got ",
              lengths.device());
  TORCH_CHECK(has_shape(lengths, {batch}), kOp, "expected `cache_lengths` of shape [batch] = [",
              batch, "], but got ", lengths.sym_sizes());
  check_cache_combinations(args);
  check_cache_without_grad(args);
  check_cache_lengths_values(args);
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
  check_cache(args);
  TORCH_CHECK_VALUE(args.dropout_p >= 0.0 && args.dropout_p <= 1.0, kOp,
                    "`dropout_p` must be in [0, 1], but got ", shortest_decimal(args.dropout_p));
}

}  // namespace torchmha::composite
