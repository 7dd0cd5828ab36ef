// torchmha::MultiHeadAttention: parameters and defaults only; the op holds the math.
#include <torch/nn/init.h>
#include <torchmha/module.h>
#include <torchmha/ops.h>
#include <torchmha/torchmha.h>

#include <cmath>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>

#include "composite/decimal.h"

namespace torchmha {

const char* version() { return "0.1.0"; }

MultiHeadAttentionOptions::MultiHeadAttentionOptions(int64_t embed_dim, int64_t num_heads)
    : embed_dim_(embed_dim), num_heads_(num_heads), kdim_(embed_dim), vdim_(embed_dim) {}

namespace {

// A number as a person writes it: a whole rope_theta such as 10000 prints whole, not as 1e+04.
std::string readable_decimal(double value) {
  constexpr double kWholeBelow = 1e17;  // Past this, whole numbers print with an exponent anyway.
  auto shortest = composite::shortest_decimal(value);
  if (shortest.find('e') == std::string::npos || !(std::abs(value) < kWholeBelow) ||
      value != std::trunc(value)) {
    return shortest;
  }
  std::ostringstream whole;
  whole << std::fixed << std::setprecision(0) << value;
  return whole.str();
}

void check_num_kv_heads(const MultiHeadAttentionOptions& options) {
  if (!options.num_kv_heads().has_value()) {
    return;
  }
  const auto num_kv_heads = *options.num_kv_heads();
  const auto num_heads = options.num_heads();
  TORCH_CHECK_VALUE(num_kv_heads > 0,
                    "torchmha::MultiHeadAttention: `num_kv_heads` must be greater than 0, got ",
                    num_kv_heads);
  TORCH_CHECK_VALUE(num_kv_heads <= num_heads, "torchmha::MultiHeadAttention: `num_kv_heads` (",
                    num_kv_heads, ") must be at most `num_heads` (", num_heads, ")");
  TORCH_CHECK_VALUE(num_heads % num_kv_heads == 0, "torchmha::MultiHeadAttention: `num_kv_heads` (",
                    num_kv_heads, ") must divide `num_heads` (", num_heads, ")");
}

void check_rotary(const MultiHeadAttentionOptions& options, int64_t head_dim) {
  if (!options.rope_theta().has_value()) {
    // Rotary details without a rotary embedding are a mistake, not something to ignore.
    TORCH_CHECK_VALUE(!options.rotary_dim().has_value(),
                      "torchmha::MultiHeadAttention: `rotary_dim`=", options.rotary_dim().value(),
                      " needs `rope_theta` (no rotary embedding without it)");
    TORCH_CHECK_VALUE(!options.rotary_interleaved(),
                      "torchmha::MultiHeadAttention: `rotary_interleaved`=true needs `rope_theta` "
                      "(no rotary embedding without it)");
    return;
  }
  const auto theta = *options.rope_theta();
  TORCH_CHECK_VALUE(std::isfinite(theta) && theta > 0.0,
                    "torchmha::MultiHeadAttention: `rope_theta` must be positive and finite, got ",
                    readable_decimal(theta));
  if (!options.rotary_dim().has_value()) {
    return;
  }
  const auto rotary_dim = *options.rotary_dim();
  TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
                    "torchmha::MultiHeadAttention: `rotary_dim` must be even, greater than 0 and "
                    "at most head_dim (embed_dim / num_heads = ",
                    head_dim, "), got ", rotary_dim);
}

}  // namespace

MultiHeadAttentionImpl::MultiHeadAttentionImpl(const MultiHeadAttentionOptions& options_)
    : options(options_) {
  reset();
}

int64_t MultiHeadAttentionImpl::head_dim() const {
  return options.embed_dim() / options.num_heads();
}

int64_t MultiHeadAttentionImpl::num_kv_heads() const {
  return options.num_kv_heads().value_or(options.num_heads());
}

int64_t MultiHeadAttentionImpl::kv_dim() const { return num_kv_heads() * head_dim(); }

void MultiHeadAttentionImpl::reset() {
  const auto embed_dim = options.embed_dim();
  TORCH_CHECK_VALUE(embed_dim > 0 && options.num_heads() > 0,
                    "torchmha::MultiHeadAttention: embed_dim and num_heads must be greater than "
                    "0, got embed_dim=",
                    embed_dim, " and num_heads=", options.num_heads());
  // in_proj_weight has 3 * embed_dim rows: refuse an embed_dim that would overflow int64 there.
  constexpr int64_t kMaxEmbedDim = std::numeric_limits<int64_t>::max() / 3;
  TORCH_CHECK_VALUE(embed_dim <= kMaxEmbedDim,
                    "torchmha::MultiHeadAttention: embed_dim=", embed_dim,
                    " is too large: 3 * embed_dim must fit in int64, so embed_dim must be at most ",
                    kMaxEmbedDim);
  TORCH_CHECK_VALUE(embed_dim % options.num_heads() == 0,
                    "torchmha::MultiHeadAttention: embed_dim ", embed_dim,
                    " must be divisible by num_heads ", options.num_heads());
  TORCH_CHECK_VALUE(options.kdim() > 0 && options.vdim() > 0,
                    "torchmha::MultiHeadAttention: kdim and vdim must be greater than 0, got kdim=",
                    options.kdim(), " and vdim=", options.vdim());
  TORCH_CHECK_VALUE(options.dropout() >= 0.0 && options.dropout() <= 1.0,
                    "torchmha::MultiHeadAttention: dropout must be in [0, 1], got ",
                    composite::shortest_decimal(options.dropout()));
  check_num_kv_heads(options);
  check_rotary(options, head_dim());
  // Keys and values have kv_dim features: embed_dim unless grouped (never more, so no overflow).
  const auto kv_features = kv_dim();
  qkv_same_embed_dim = options.kdim() == embed_dim && options.vdim() == embed_dim;
  if (qkv_same_embed_dim) {
    in_proj_weight = register_parameter("in_proj_weight",
                                        torch::empty({embed_dim + 2 * kv_features, embed_dim}));
  } else {
    q_proj_weight = register_parameter("q_proj_weight", torch::empty({embed_dim, embed_dim}));
    k_proj_weight =
        register_parameter("k_proj_weight", torch::empty({kv_features, options.kdim()}));
    v_proj_weight =
        register_parameter("v_proj_weight", torch::empty({kv_features, options.vdim()}));
  }
  if (options.bias()) {
    in_proj_bias = register_parameter("in_proj_bias", torch::empty({embed_dim + 2 * kv_features}));
  }
  out_proj = register_module(
      "out_proj",
      torch::nn::Linear(torch::nn::LinearOptions(embed_dim, embed_dim).bias(options.bias())));
  if (options.add_bias_kv()) {
    bias_k = register_parameter("bias_k", torch::empty({1, 1, kv_features}));
    bias_v = register_parameter("bias_v", torch::empty({1, 1, kv_features}));
  }
  reset_parameters();
}

void MultiHeadAttentionImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  for (auto* weight : {&in_proj_weight, &q_proj_weight, &k_proj_weight, &v_proj_weight}) {
    if (weight->defined()) {
      torch::nn::init::xavier_uniform_(*weight);
    }
  }
  if (in_proj_bias.defined()) {
    in_proj_bias.zero_();
    out_proj->bias.zero_();
  }
  for (auto* bias : {&bias_k, &bias_v}) {
    if (bias->defined()) {
      torch::nn::init::xavier_normal_(*bias);
    }
  }
}

std::tuple<torch::Tensor, torch::Tensor> MultiHeadAttentionImpl::forward(
    const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
    const torch::Tensor& key_padding_mask, bool need_weights, const torch::Tensor& attn_mask,
    bool average_attn_weights, bool is_causal, const torch::Tensor& positions,
    const KVCache& kv_cache) {
  const auto optional = [](const torch::Tensor& t) {
    return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
  };
  std::optional<torch::Tensor> cache_key, cache_value, cache_lengths;
  if (!kv_cache.is_empty()) {
    cache_key = kv_cache->key;
    cache_value = kv_cache->value;
    cache_lengths = kv_cache->seq_lens;
  }
  auto [output, weights] = multi_head_attention(
      query, key, value, options.num_heads(), optional(in_proj_weight), optional(in_proj_bias),
      optional(q_proj_weight), optional(k_proj_weight), optional(v_proj_weight), out_proj->weight,
      optional(out_proj->bias), optional(bias_k), optional(bias_v), options.add_zero_attn(),
      options.dropout(), is_training(), optional(key_padding_mask), optional(attn_mask),
      need_weights, average_attn_weights, is_causal, options.batch_first(), options.num_kv_heads(),
      options.rope_theta(), options.rotary_dim(), options.rotary_interleaved(), optional(positions),
      cache_key, cache_value, cache_lengths);
  return {output, need_weights ? weights : torch::Tensor()};
}

KVCache MultiHeadAttentionImpl::new_kv_cache(int64_t batch_size, int64_t max_seq_len,
                                             std::optional<c10::ScalarType> dtype,
                                             std::optional<c10::Device> device) const {
  const auto& weight = qkv_same_embed_dim ? in_proj_weight : k_proj_weight;
  return KVCache(KVCacheOptions(batch_size, num_kv_heads(), max_seq_len, head_dim())
                     .dtype(dtype.value_or(weight.scalar_type()))
                     .device(device.value_or(weight.device())));
}

void MultiHeadAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "torchmha::MultiHeadAttention(embed_dim=" << options.embed_dim()
         << ", num_heads=" << options.num_heads() << ", dropout=" << options.dropout()
         << ", bias=" << std::boolalpha << options.bias();
  if (options.add_bias_kv()) {
    stream << ", add_bias_kv=true";
  }
  if (options.add_zero_attn()) {
    stream << ", add_zero_attn=true";
  }
  if (!qkv_same_embed_dim) {
    stream << ", kdim=" << options.kdim() << ", vdim=" << options.vdim();
  }
  stream << ", batch_first=" << options.batch_first();
  if (options.num_kv_heads().has_value()) {
    stream << ", num_kv_heads=" << *options.num_kv_heads();
  }
  if (options.rope_theta().has_value()) {
    stream << ", rope_theta=" << readable_decimal(*options.rope_theta());
  }
  if (options.rotary_dim().has_value()) {
    stream << ", rotary_dim=" << *options.rotary_dim();
  }
  if (options.rotary_interleaved()) {
    stream << ", rotary_interleaved=true";
  }
  stream << std::noboolalpha << ")";
}

}  // namespace torchmha
