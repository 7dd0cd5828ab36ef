// Forward and backward of torchmha::MultiHeadAttention from C++, against LibTorch's own module.
#include <torchmha/torchmha.h>

#include "test_helpers.h"

namespace {

using torchmha::testing::expect_close;

constexpr double kFloat64Tolerance = 1e-12;

struct Pair {
  torchmha::MultiHeadAttention ours{nullptr};
  torch::nn::MultiheadAttention reference{nullptr};
};

// Both modules in float64 with the same weights (random biases too, so they are checked).
Pair make_pair(int64_t embed_dim, int64_t num_heads) {
  torch::manual_seed(0);
  Pair pair{torchmha::MultiHeadAttention(embed_dim, num_heads),
            torch::nn::MultiheadAttention(embed_dim, num_heads)};
  pair.ours->to(torch::kFloat64);
  pair.reference->to(torch::kFloat64);
  torch::NoGradGuard no_grad;
  auto reference_parameters = pair.reference->named_parameters();
  for (auto& parameter : pair.ours->named_parameters()) {
    parameter.value().normal_(0.0, 0.3);
    reference_parameters[parameter.key()].copy_(parameter.value());
  }
  return pair;
}

TEST(Forward, SelfAttentionMatchesLibTorch) {
  auto [ours, reference] = make_pair(16, 4);
  const auto x = torch::randn({5, 3, 16}, torch::kFloat64);
  const auto [output, weights] = ours(x, x, x);
  const auto [expected_output, expected_weights] = reference(x, x, x);
  expect_close(output, expected_output, kFloat64Tolerance);
  expect_close(weights, expected_weights, kFloat64Tolerance);
}

TEST(Forward, CrossAttentionWithPaddingMaskMatchesLibTorch) {
  auto [ours, reference] = make_pair(12, 3);
  const auto query = torch::randn({4, 2, 12}, torch::kFloat64);
  const auto memory = torch::randn({6, 2, 12}, torch::kFloat64);
  auto padding = torch::zeros({2, 6}, torch::kBool);
  padding.index_put_({1, torch::indexing::Slice(4)}, true);
  const auto [output, weights] = ours(query, memory, memory, padding);
  const auto [expected_output, expected_weights] = reference(query, memory, memory, padding);
  expect_close(output, expected_output, kFloat64Tolerance);
  expect_close(weights, expected_weights, kFloat64Tolerance);
  EXPECT_EQ(weights.index({1, torch::indexing::Slice(), torch::indexing::Slice(4)})
                .abs()
                .max()
                .item<double>(),
            0.0);
}

TEST(Forward, BackwardMatchesLibTorch) {
  auto [ours, reference] = make_pair(8, 2);
  const auto x = torch::randn({3, 2, 8}, torch::kFloat64);
  const auto x_ours = x.clone().requires_grad_();
  const auto x_reference = x.clone().requires_grad_();
  std::get<0>(ours(x_ours, x_ours, x_ours)).pow(2).sum().backward();
  std::get<0>(reference(x_reference, x_reference, x_reference)).pow(2).sum().backward();
  expect_close(x_ours.grad(), x_reference.grad(), kFloat64Tolerance);
  auto reference_parameters = reference->named_parameters();
  for (const auto& parameter : ours->named_parameters()) {
    ASSERT_TRUE(parameter.value().grad().defined()) << parameter.key();
    expect_close(parameter.value().grad(), reference_parameters[parameter.key()].grad(),
                 kFloat64Tolerance);
  }
}

// Scores of 19 MB take the CPU's blocked weights path: blocks of query rows spread over the
// intra-op threads in the forward, heads over the threads in the backward.
TEST(Forward, LargeScoresWithWeightsMatchLibTorchForwardAndBackward) {
  auto [ours, reference] = make_pair(8, 2);
  const auto x = torch::randn({1100, 1, 8}, torch::kFloat64);
  const auto x_ours = x.clone().requires_grad_();
  const auto x_reference = x.clone().requires_grad_();
  const auto [output, weights] = ours(x_ours, x_ours, x_ours);
  const auto [expected_output, expected_weights] = reference(x_reference, x_reference, x_reference);
  ASSERT_NE(weights.grad_fn()->name().find("BlockedAttention"), std::string::npos)
      << "the blocked path was not taken: " << weights.grad_fn()->name();
  expect_close(output, expected_output, kFloat64Tolerance);
  expect_close(weights, expected_weights, kFloat64Tolerance);
  (output.sum() + weights.pow(2).sum()).backward();
  (expected_output.sum() + expected_weights.pow(2).sum()).backward();
  expect_close(x_ours.grad(), x_reference.grad(), kFloat64Tolerance);
  auto reference_parameters = reference->named_parameters();
  for (const auto& parameter : ours->named_parameters()) {
    expect_close(parameter.value().grad(), reference_parameters[parameter.key()].grad(),
                 kFloat64Tolerance);
  }
}

TEST(Forward, NeedWeightsFalseGivesUndefinedWeightsAndTheSameOutput) {
  auto [ours, reference] = make_pair(16, 4);
  const auto x = torch::randn({5, 3, 16}, torch::kFloat64);
  const auto [output, weights] = ours->forward(x, x, x, {}, /*need_weights=*/false);
  EXPECT_FALSE(weights.defined());
  expect_close(output, std::get<0>(reference(x, x, x)), kFloat64Tolerance);
}

TEST(Forward, PerHeadWeights) {
  auto [ours, reference] = make_pair(16, 4);
  const auto x = torch::randn({5, 3, 16}, torch::kFloat64);
  const auto weights =
      std::get<1>(ours->forward(x, x, x, {}, true, {}, /*average_attn_weights=*/false));
  const auto expected = std::get<1>(reference->forward(x, x, x, {}, true, {}, false));
  ASSERT_EQ(weights.sizes(), (std::vector<int64_t>{3, 4, 5, 5}));
  expect_close(weights, expected, kFloat64Tolerance);
}

TEST(Forward, BatchFirstAndUnbatchedLayouts) {
  auto [ours, reference] = make_pair(8, 2);
  const auto x = torch::randn({4, 3, 8}, torch::kFloat64);
  const auto expected = std::get<0>(reference(x, x, x));
  torchmha::MultiHeadAttention batch_first(
      torchmha::MultiHeadAttentionOptions(8, 2).batch_first(true));
  batch_first->to(torch::kFloat64);
  {
    torch::NoGradGuard no_grad;
    auto source = ours->named_parameters();
    for (auto& parameter : batch_first->named_parameters()) {
      parameter.value().copy_(source[parameter.key()]);
    }
  }
  const auto y = x.transpose(0, 1);
  expect_close(std::get<0>(batch_first(y, y, y)), expected.transpose(0, 1), kFloat64Tolerance);
  const auto single = x.select(1, 0);
  expect_close(std::get<0>(ours(single, single, single)), expected.select(1, 0), kFloat64Tolerance);
}

TEST(Forward, DispatcherEntryPointEqualsTheModule) {
  auto [ours, reference] = make_pair(8, 2);
  const auto x = torch::randn({3, 2, 8}, torch::kFloat64);
  const auto [output, weights] = torchmha::multi_head_attention(
      x, x, x, 2, ours->in_proj_weight, ours->in_proj_bias, std::nullopt, std::nullopt,
      std::nullopt, ours->out_proj->weight, ours->out_proj->bias, std::nullopt, std::nullopt, false,
      0.0, false, std::nullopt, std::nullopt, true, true, false, false);
  expect_close(output, std::get<0>(reference(x, x, x)), kFloat64Tolerance);
  expect_close(weights, std::get<1>(reference(x, x, x)), kFloat64Tolerance);
}

TEST(Forward, DispatcherEntryPointTakesTheSchemaDefaultsAndNamedOptions) {
  auto [ours, reference] = make_pair(8, 2);
  ours->eval();
  const auto x = torch::randn({3, 2, 8}, torch::kFloat64);
  const auto expected = reference(x, x, x);
  const auto [output, weights] = torchmha::multi_head_attention(
      x, x, x, 2, ours->in_proj_weight, ours->in_proj_bias, std::nullopt, std::nullopt,
      std::nullopt, ours->out_proj->weight, ours->out_proj->bias);
  expect_close(output, std::get<0>(expected), kFloat64Tolerance);
  expect_close(weights, std::get<1>(expected), kFloat64Tolerance);

  const auto y = x.transpose(0, 1);
  const auto [named_output, named_weights] = torchmha::multi_head_attention(
      y, y, y,
      torchmha::MultiHeadAttentionFuncOptions(2, ours->out_proj->weight)
          .in_proj_weight(ours->in_proj_weight)
          .in_proj_bias(ours->in_proj_bias)
          .out_proj_bias(ours->out_proj->bias)
          .average_attn_weights(false)
          .batch_first(true));
  expect_close(named_output, std::get<0>(expected).transpose(0, 1), kFloat64Tolerance);
  expect_close(named_weights.mean(1), std::get<1>(expected), kFloat64Tolerance);
}

TEST(Forward, IsCausalWithoutMaskIsCausalAttention) {
  auto [ours, reference] = make_pair(8, 2);
  const auto x = torch::randn({5, 2, 8}, torch::kFloat64);
  // LibTorch's module adds a bool mask as 0/1, so it gets the additive form of the causal mask.
  const auto causal = torch::zeros({5, 5}, torch::kFloat64)
                          .masked_fill(torch::ones({5, 5}, torch::kBool).triu(1), -INFINITY);
  const auto expected = std::get<0>(reference->forward(x, x, x, {}, false, causal));
  for (const bool need_weights : {false, true}) {
    const auto output =
        std::get<0>(ours->forward(x, x, x, {}, need_weights, {}, true, /*is_causal=*/true));
    expect_close(output, expected, kFloat64Tolerance);
  }
}

TEST(Forward, FullyMaskedQueryAttendsToNothing) {
  auto [ours, reference] = make_pair(8, 2);
  const auto x = torch::randn({3, 2, 8}, torch::dtype(torch::kFloat64).requires_grad(true));
  auto mask = torch::zeros({3, 3}, torch::kBool);
  mask.index_put_({1}, true);  // query 1 may attend to no key
  for (const bool need_weights : {false, true}) {
    const auto [output, weights] = ours->forward(x, x, x, {}, need_weights, mask);
    EXPECT_TRUE(torch::isfinite(output).all().item<bool>());
    // Zero attention output, so only the output projection's bias remains.
    expect_close(output.select(0, 1), ours->out_proj->bias.expand({2, 8}), kFloat64Tolerance);
    if (need_weights) {
      EXPECT_EQ(weights.select(1, 1).abs().max().item<double>(), 0.0);
    }
    const auto gradient = torch::autograd::grad({output.sum()}, {x}, {}, /*retain_graph=*/true)[0];
    EXPECT_TRUE(torch::isfinite(gradient).all().item<bool>());
  }
}

TEST(Forward, CallableThroughAnyModule) {
  torchmha::MultiHeadAttention attention(8, 2);
  torch::nn::AnyModule any(attention);
  const auto x = torch::randn({3, 2, 8});
  const auto [output, weights] = any.forward<std::tuple<torch::Tensor, torch::Tensor>>(x, x, x);
  EXPECT_EQ(output.sizes(), x.sizes());
  EXPECT_EQ(weights.sizes(), (std::vector<int64_t>{2, 3, 3}));
}

TEST(Forward, DropoutOnlyInTraining) {
  torchmha::MultiHeadAttention attention(torchmha::MultiHeadAttentionOptions(8, 2).dropout(0.5));
  const auto x = torch::randn({6, 2, 8});
  attention->eval();
  const auto first = std::get<0>(attention(x, x, x));
  EXPECT_TRUE(torch::equal(first, std::get<0>(attention(x, x, x))));
  attention->train();
  torch::manual_seed(1);
  const auto a = std::get<0>(attention(x, x, x));
  torch::manual_seed(1);
  const auto b = std::get<0>(attention(x, x, x));
  EXPECT_TRUE(torch::equal(a, b));  // reproducible under the seed
  EXPECT_FALSE(torch::allclose(a, first));
}

}  // namespace
