// torchmha::KVCache with torchmha::MultiHeadAttention: decoding a sequence step by step equals
// the module's full causal forward over it (itself checked against PyTorch elsewhere), and the
// cache's own operations (reorder, reset, clone, to) and refusals.
#include <torchmha/torchmha.h>

#include <vector>

#include "test_helpers.h"

namespace {

using torchmha::testing::expect_close;
using torchmha::testing::expect_error_containing;

constexpr double kTolerance = 1e-12;
constexpr int64_t kEmbedDim = 24;
constexpr int64_t kHeads = 4;

// float64, batch-first, 2 key/value heads, rotary embeddings, random weights and biases.
torchmha::MultiHeadAttention grouped_rotary_module() {
  torchmha::MultiHeadAttention attention(torchmha::MultiHeadAttentionOptions(kEmbedDim, kHeads)
                                             .batch_first(true)
                                             .num_kv_heads(2)
                                             .rope_theta(100.0));
  attention->to(torch::kFloat64);
  torch::NoGradGuard no_grad;
  for (auto& parameter : attention->parameters()) {
    parameter.copy_(torch::randn_like(parameter) * 0.5);
  }
  return attention;
}

// Cache weights (..., L, max_seq_len): the expected ones over the first `length` positions, zero
// beyond.
void expect_cache_weights(const torch::Tensor& weights, const torch::Tensor& expected,
                          int64_t length) {
  expect_close(weights.narrow(-1, 0, length), expected, kTolerance);
  EXPECT_TRUE(weights.narrow(-1, length, weights.size(-1) - length).eq(0).all().item<bool>());
}

class KVCacheDecoding : public ::testing::TestWithParam<std::vector<int64_t>> {};

TEST_P(KVCacheDecoding, EqualsTheFullCausalForward) {
  torch::manual_seed(0);
  auto attention = grouped_rotary_module();
  torch::NoGradGuard no_grad;
  const auto sequence = torch::randn({2, 9, kEmbedDim}, torch::kFloat64);
  const auto [expected_output, expected_weights] =
      attention->forward(sequence, sequence, sequence, {}, true, {}, true, /*is_causal=*/true);
  auto cache = attention->new_kv_cache(2, 12);
  EXPECT_EQ(cache->key.sizes().vec(), (std::vector<int64_t>{2, 2, 12, 6}));
  EXPECT_EQ(cache->key.scalar_type(), torch::kFloat64);
  int64_t start = 0;
  for (const int64_t length : GetParam()) {
    const auto tokens = sequence.narrow(1, start, length);
    const auto [output, weights] = attention->forward(tokens, tokens, tokens, {}, true, {}, true,
                                                      /*is_causal=*/true, {}, cache);
    const int64_t end = start + length;
    expect_close(output, expected_output.narrow(1, start, length), kTolerance);
    expect_cache_weights(weights, expected_weights.narrow(1, start, length).narrow(2, 0, end), end);
    EXPECT_TRUE(cache->seq_lens.equal(torch::full({2}, end, torch::kLong)));
    start = end;
  }
}

INSTANTIATE_TEST_SUITE_P(Chunkings, KVCacheDecoding,
                         ::testing::Values(std::vector<int64_t>{4, 1, 1, 1, 1, 1},
                                           std::vector<int64_t>{3, 2, 4}));

TEST(KVCache, RaggedPromptsAdvanceByTheirRealTokens) {
  torch::manual_seed(0);
  auto attention = grouped_rotary_module();
  torch::NoGradGuard no_grad;
  const auto first = torch::randn({1, 5, kEmbedDim}, torch::kFloat64);
  const auto second = torch::randn({1, 3, kEmbedDim}, torch::kFloat64);
  // The second prompt is two tokens, right-padded to five.
  const auto prompts = torch::cat(
      {first.narrow(1, 0, 4),
       torch::cat({second.narrow(1, 0, 2), torch::zeros({1, 2, kEmbedDim}, torch::kFloat64)}, 1)});
  auto padding = torch::zeros({2, 4}, torch::kBool);
  padding.narrow(1, 2, 2).narrow(0, 1, 1).fill_(true);
  auto cache = attention->new_kv_cache(2, 6);
  attention->forward(prompts, prompts, prompts, padding, false, {}, true, /*is_causal=*/true, {},
                     cache);
  EXPECT_TRUE(cache->seq_lens.equal(torch::tensor({4, 2}, torch::kLong)));
  const auto tokens = torch::cat({first.narrow(1, 4, 1), second.narrow(1, 2, 1)});
  const auto [output, weights] = attention->forward(tokens, tokens, tokens, {}, false, {}, true,
                                                    /*is_causal=*/true, {}, cache);
  EXPECT_FALSE(weights.defined());
  const auto [first_expected, first_weights] =
      attention->forward(first, first, first, {}, false, {}, true, /*is_causal=*/true);
  const auto [second_expected, second_weights] =
      attention->forward(second, second, second, {}, false, {}, true, /*is_causal=*/true);
  expect_close(output.narrow(0, 0, 1), first_expected.narrow(1, 4, 1), kTolerance);
  expect_close(output.narrow(0, 1, 1), second_expected.narrow(1, 2, 1), kTolerance);
  EXPECT_TRUE(cache->seq_lens.equal(torch::tensor({5, 3}, torch::kLong)));
}

TEST(KVCache, ReorderResetCloneAndTo) {
  torch::manual_seed(0);
  auto attention = grouped_rotary_module();
  torch::NoGradGuard no_grad;
  auto cache = attention->new_kv_cache(3, 4);
  const auto prompts = torch::randn({3, 2, kEmbedDim}, torch::kFloat64);
  attention->forward(prompts, prompts, prompts, {}, false, {}, true, /*is_causal=*/true, {}, cache);
  cache->seq_lens[2] = 1;
  const auto key = cache->key.clone();
  const auto lengths = cache->seq_lens.clone();
  cache->reorder(torch::tensor({2, 0, 0}));
  EXPECT_TRUE(cache->key[0].equal(key[2]));
  EXPECT_TRUE(cache->key[1].equal(key[0]));
  EXPECT_TRUE(cache->key[2].equal(key[0]));
  EXPECT_TRUE(cache->seq_lens.equal(torch::tensor({1, 2, 2}, torch::kLong)));
  EXPECT_TRUE(lengths.equal(torch::tensor({2, 2, 1}, torch::kLong)));

  const auto before = cache->key.clone();
  expect_error_containing(
      [&] {
        cache->reorder(torch::tensor({0, 3, 1}));
      },
      {"`indices` must be in [0, 3), but got 3"});
  expect_error_containing(
      [&] {
        cache->reorder(torch::tensor({0, 1}));
      },
      {"expected integer `indices` of shape [batch_size] = [3]"});
  EXPECT_TRUE(cache->key.equal(before));

  const auto copy = std::dynamic_pointer_cast<torchmha::KVCacheImpl>(cache->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(copy->key.equal(cache->key));
  EXPECT_TRUE(copy->seq_lens.equal(cache->seq_lens));
  copy->reset();
  EXPECT_TRUE(cache->key.equal(before));  // the original keeps its contents
  EXPECT_EQ(copy->seq_lens.sum().item<int64_t>(), 0);
  EXPECT_FALSE(copy->key.any().item<bool>());

  cache->to(torch::kFloat32);
  EXPECT_EQ(cache->key.scalar_type(), torch::kFloat32);
  EXPECT_EQ(cache->seq_lens.scalar_type(), torch::kLong);
  cache->reset();
  EXPECT_EQ(cache->seq_lens.sum().item<int64_t>(), 0);
  expect_error_containing([] { (void)torchmha::KVCache(1, 0, 4, 2); },
                          {"`num_kv_heads` must be positive, got 0"});
}

TEST(KVCache, ARefusedStepLeavesTheCacheUnchanged) {
  torch::manual_seed(0);
  auto attention = grouped_rotary_module();
  auto cache = attention->new_kv_cache(2, 6);
  const auto prompts = torch::randn({2, 5, kEmbedDim}, torch::kFloat64);
  {
    torch::NoGradGuard no_grad;
    attention->forward(prompts, prompts, prompts, {}, false, {}, true, /*is_causal=*/true, {},
                       cache);
  }
  const auto key = cache->key.clone();
  const auto value = cache->value.clone();
  const auto lengths = cache->seq_lens.clone();
  const auto tokens = torch::randn({2, 2, kEmbedDim}, torch::kFloat64);
  expect_error_containing(
      [&] {
        torch::NoGradGuard no_grad;
        attention->forward(tokens, tokens, tokens, {}, false, {}, true, true, {}, cache);
      },
      {"the step would pass max_seq_len 6", "entry 0 at length 5 with 2 new tokens needs 1 more"});
  expect_error_containing(
      [&] { attention->forward(tokens, tokens, tokens, {}, false, {}, true, true, {}, cache); },
      {"a key/value cache is for inference"});
  EXPECT_TRUE(cache->key.equal(key));
  EXPECT_TRUE(cache->value.equal(value));
  EXPECT_TRUE(cache->seq_lens.equal(lengths));
}

}  // namespace
