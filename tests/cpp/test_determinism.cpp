// The same seed gives bitwise-identical results on CPU, dropout included; dropout draws from
// LibTorch's default CPU generator, so its seed and saved state reproduce a run.
#include <ATen/CPUGeneratorImpl.h>
#include <torchmha/torchmha.h>

#include "test_helpers.h"

namespace {

struct Results {
  torch::Tensor output, weights, query_grad, weight_grad;
};

// Builds the module and its inputs from the current random state, then runs a training step.
Results run_from_current_state(bool need_weights) {
  torchmha::MultiHeadAttention attention(torchmha::MultiHeadAttentionOptions(16, 4).dropout(0.5));
  attention->train();
  const auto query = torch::randn({6, 3, 16}, torch::requires_grad());
  auto [output, weights] = attention->forward(query, query, query, {}, need_weights);
  output.square().sum().backward();
  return {output, weights, query.grad(), attention->in_proj_weight.grad()};
}

void expect_bitwise_equal(const Results& a, const Results& b) {
  EXPECT_TRUE(torch::equal(a.output, b.output));
  EXPECT_EQ(a.weights.defined(), b.weights.defined());
  if (a.weights.defined()) {
    EXPECT_TRUE(torch::equal(a.weights, b.weights));
  }
  EXPECT_TRUE(torch::equal(a.query_grad, b.query_grad));
  EXPECT_TRUE(torch::equal(a.weight_grad, b.weight_grad));
}

TEST(Determinism, SameSeedGivesBitwiseIdenticalResultsWithDropout) {
  for (const bool need_weights : {true, false}) {
    torch::manual_seed(42);
    const auto first = run_from_current_state(need_weights);
    torch::manual_seed(42);
    const auto second = run_from_current_state(need_weights);
    expect_bitwise_equal(first, second);
    torch::manual_seed(43);
    const auto other_seed = run_from_current_state(need_weights);
    EXPECT_FALSE(torch::equal(first.output, other_seed.output)) << "the seed changed nothing";
  }
}

TEST(Determinism, DropoutFollowsTheDefaultGeneratorState) {
  torch::manual_seed(7);
  torchmha::MultiHeadAttention attention(torchmha::MultiHeadAttentionOptions(16, 4).dropout(0.5));
  const auto query = torch::randn({6, 3, 16});
  auto generator = at::detail::getDefaultCPUGenerator();
  const auto state = generator.get_state();
  const auto first = std::get<0>(attention(query, query, query));
  const auto next = std::get<0>(attention(query, query, query));
  EXPECT_FALSE(torch::equal(first, next)) << "dropout drew the same mask twice";
  generator.set_state(state);
  EXPECT_TRUE(torch::equal(std::get<0>(attention(query, query, query)), first));
  EXPECT_TRUE(torch::equal(std::get<0>(attention(query, query, query)), next));
}

TEST(Determinism, EvalModeIgnoresTheGenerator) {
  torchmha::MultiHeadAttention attention(torchmha::MultiHeadAttentionOptions(16, 4).dropout(0.5));
  attention->eval();
  const auto query = torch::randn({6, 3, 16});
  torch::manual_seed(1);
  const auto first = std::get<0>(attention(query, query, query));
  torch::manual_seed(2);
  EXPECT_TRUE(torch::equal(std::get<0>(attention(query, query, query)), first));
}

}  // namespace
