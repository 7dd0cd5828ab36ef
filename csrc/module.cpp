// torchmha::MultiHeadAttention: parameters and defaults only; the op holds the math.
#include <torch/nn/init.h>
#include <torchmha/module.h>
#include <torchmha/ops.h>
#include <torchmha/torchmha.h>

#include <limits>

#include "composite/decimal.h"

namespace torchmha {

const char* version() { return "0.1.0"; }

MultiHeadAttentionOptions::MultiHeadAttentionOptions(int64_t embed_dim, int64_t num_heads)
    : embed_dim_(embed_dim), num_heads_(num_heads), kdim_(embed_dim), vdim_(embed_dim) {}

MultiHeadAttentionImpl::MultiHeadAttentionImpl(const MultiHeadAttentionOptions& options_)
    : options(options_) {
  reset();
}

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
  qkv_same_embed_dim = options.kdim() == embed_dim && options.vdim() == embed_dim;
  if (qkv_same_embed_dim) {
    in_proj_weight = register_parameter("in_proj_weight", torch::empty({3 * embed_dim, embed_dim}));
  } else {
    q_proj_weight = register_parameter("q_proj_weight", torch::empty({embed_dim, embed_dim}));
    k_proj_weight = register_parameter("k_proj_weight", torch::empty({embed_dim, options.kdim()}));
    v_proj_weight = register_parameter("v_proj_weight", torch::empty({embed_dim, options.vdim()}));
  }
  if (options.bias()) {
    in_proj_bias = register_parameter("in_proj_bias", torch::empty({3 * embed_dim}));
  }
  out_proj = register_module(
      "out_proj",
      torch::nn::Linear(torch::nn::LinearOptions(embed_dim, embed_dim).bias(options.bias())));
  if (options.add_bias_kv()) {
    bias_k = register_parameter("bias_k", torch::empty({1, 1, embed_dim}));
    bias_v = register_parameter("bias_v", torch::empty({1, 1, embed_dim}));
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
    bool average_attn_weights, bool is_causal) {
  const auto optional = [](const torch::Tensor& t) {
    return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
  };
  auto [output, weights] = multi_head_attention(
      query, key, value, options.num_heads(), optional(in_proj_weight), optional(in_proj_bias),
      optional(q_proj_weight), optional(k_proj_weight), optional(v_proj_weight), out_proj->weight,
      optional(out_proj->bias), optional(bias_k), optional(bias_v), options.add_zero_attn(),
      options.dropout(), is_training(), optional(key_padding_mask), optional(attn_mask),
      need_weights, average_attn_weights, is_causal, options.batch_first());
  return {output, need_weights ? weights : torch::Tensor()};
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
  stream << ", batch_first=" << options.batch_first() << std::noboolalpha << ")";
}

}  // namespace torchmha
