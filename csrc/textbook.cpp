// The chapter's API as an adapter: converts its arguments to the op's, adds no math.
#include <torchmha/ops.h>
#include <torchmha/textbook.h>

#include <torch/nn/modules/container/modulelist.h>

#include "composite/decimal.h"

namespace torchmha {

TextbookMultiHeadAttentionOptions::TextbookMultiHeadAttentionOptions(int64_t h, int64_t d_model)
    : h_(h), d_model_(d_model) {}

TextbookMultiHeadAttentionImpl::TextbookMultiHeadAttentionImpl(
    const TextbookMultiHeadAttentionOptions& options_)
    : options(options_) {
  reset();
}

TextbookMultiHeadAttentionImpl::TextbookMultiHeadAttentionImpl(
    const TextbookMultiHeadAttentionImpl& other)
    : torch::nn::Cloneable<TextbookMultiHeadAttentionImpl>(other),
      options(other.options),
      linear_layers(other.linear_layers),
      output_linear(other.output_linear),
      attn(other.last_attn()) {}

TextbookMultiHeadAttentionImpl& TextbookMultiHeadAttentionImpl::operator=(
    const TextbookMultiHeadAttentionImpl& other) {
  if (this != &other) {
    torch::nn::Cloneable<TextbookMultiHeadAttentionImpl>::operator=(other);
    options = other.options;
    linear_layers = other.linear_layers;
    output_linear = other.output_linear;
    auto other_attn = other.last_attn();
    const std::lock_guard<std::mutex> lock(attn_mutex_);
    attn = std::move(other_attn);
  }
  return *this;
}

void TextbookMultiHeadAttentionImpl::reset() {
  TORCH_CHECK_VALUE(
      options.h() > 0 && options.d_model() > 0 && options.d_model() % options.h() == 0,
      "torchmha::TextbookMultiHeadAttention: d_model must be a positive multiple "
      "of h, got h=",
      options.h(), " and d_model=", options.d_model());
  TORCH_CHECK_VALUE(options.dropout() >= 0.0 && options.dropout() <= 1.0,
                    "torchmha::TextbookMultiHeadAttention: dropout must be in [0, 1], got ",
                    composite::shortest_decimal(options.dropout()));
  const auto d_model = options.d_model();
  linear_layers =
      register_module("linear_layers", torch::nn::ModuleList(torch::nn::Linear(d_model, d_model),
                                                             torch::nn::Linear(d_model, d_model),
                                                             torch::nn::Linear(d_model, d_model)));
  output_linear = register_module("output_linear", torch::nn::Linear(d_model, d_model));
}

namespace {

// Whether a tensor of `sizes` broadcasts to `target` (NumPy's rules, trailing dimensions first).
bool broadcasts_to(at::IntArrayRef sizes, at::IntArrayRef target) {
  if (sizes.size() > target.size()) {
    return false;
  }
  const size_t offset = target.size() - sizes.size();
  for (size_t dim = 0; dim < sizes.size(); ++dim) {
    if (sizes[dim] != 1 && sizes[dim] != target[offset + dim]) {
      return false;
    }
  }
  return true;
}

}  // namespace

torch::Tensor TextbookMultiHeadAttentionImpl::forward(const torch::Tensor& query,
                                                      const torch::Tensor& key,
                                                      const torch::Tensor& value,
                                                      const torch::Tensor& mask) {
  // An undefined tensor reads as shape [0]; say that it is undefined instead.
  for (const auto& [tensor, name] :
       {std::pair{&query, "query"}, {&key, "key"}, {&value, "value"}}) {
    TORCH_CHECK(tensor->defined(), "torchmha::TextbookMultiHeadAttention: expected a defined `",
                name, "`, but got an undefined tensor");
  }
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              "torchmha::TextbookMultiHeadAttention: expected batch-first 3-D `query`, `key` "
              "and `value` (B, L, d_model), but got ",
              query.sizes(), ", ", key.sizes(), " and ", value.sizes());
  const auto projection = [this](size_t index) -> const torch::nn::LinearImpl& {
    return *linear_layers->ptr<torch::nn::LinearImpl>(index);
  };
  std::optional<torch::Tensor> attn_mask;
  if (mask.defined()) {
    // The chapter's mask is nonzero where attention is allowed and broadcasts to (B, h, L, S);
    // the op takes true where it is not allowed, as (B * h, L, S).
    const auto batch = query.size(0);
    const auto target_len = query.size(1);
    const auto source_len = key.size(1);
    const std::vector<int64_t> target = {batch, options.h(), target_len, source_len};
    TORCH_CHECK(broadcasts_to(mask.sizes(), target),
                "torchmha::TextbookMultiHeadAttention: expected `mask` broadcastable to (B, h, L, "
                "S) = (",
                batch, ", ", options.h(), ", ", target_len, ", ", source_len, "), but got ",
                mask.sizes());
    attn_mask = (mask == 0)
                    .expand({batch, options.h(), target_len, source_len})
                    .reshape({batch * options.h(), target_len, source_len});
  }
  const auto in_proj_bias =
      torch::cat({projection(0).bias, projection(1).bias, projection(2).bias});
  auto [output, weights] = multi_head_attention(
      query, key, value, options.h(), /*in_proj_weight=*/std::nullopt, in_proj_bias,
      projection(0).weight, projection(1).weight, projection(2).weight, output_linear->weight,
      output_linear->bias, /*bias_k=*/std::nullopt, /*bias_v=*/std::nullopt,
      /*add_zero_attn=*/false, options.dropout(), is_training(),
      /*key_padding_mask=*/std::nullopt, attn_mask, /*need_weights=*/true,
      /*average_attn_weights=*/false, /*is_causal=*/false, /*batch_first=*/true);
  {
    const std::lock_guard<std::mutex> lock(attn_mutex_);
    attn = std::move(weights);
  }
  return output;
}

torch::Tensor TextbookMultiHeadAttentionImpl::last_attn() const {
  const std::lock_guard<std::mutex> lock(attn_mutex_);
  return attn;
}

void TextbookMultiHeadAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "torchmha::TextbookMultiHeadAttention(h=" << options.h()
         << ", d_model=" << options.d_model() << ", dropout=" << options.dropout() << ")";
}

}  // namespace torchmha
