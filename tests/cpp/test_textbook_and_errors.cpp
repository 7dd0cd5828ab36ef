// The chapter's adapter against the chapter's formula, and the op's error messages.
#include <torchmha/torchmha.h>

#include "test_helpers.h"

namespace {

using torchmha::testing::expect_close;
using torchmha::testing::expect_error_containing;

// The chapter's computation written out (BERT-pytorch's Attention, mask nonzero = attend).
std::pair<torch::Tensor, torch::Tensor> chapter_reference(
    torchmha::TextbookMultiHeadAttentionImpl& module, const torch::Tensor& query,
    const torch::Tensor& key, const torch::Tensor& value, const torch::Tensor& mask) {
  const auto h = module.options.h();
  const auto d_k = module.options.d_model() / h;
  const auto batch = query.size(0);
  std::vector<torch::Tensor> projected;
  const torch::Tensor inputs[] = {query, key, value};
  for (size_t i = 0; i < 3; ++i) {
    auto& linear = *module.linear_layers->ptr<torch::nn::LinearImpl>(i);
    projected.push_back(linear.forward(inputs[i]).view({batch, -1, h, d_k}).transpose(1, 2));
  }
  auto scores = torch::matmul(projected[0], projected[1].transpose(-2, -1)) / std::sqrt(d_k);
  if (mask.defined()) {
    scores = scores.masked_fill(mask == 0, -1e9);
  }
  const auto probabilities = torch::softmax(scores, -1);
  const auto x = torch::matmul(probabilities, projected[2])
                     .transpose(1, 2)
                     .contiguous()
                     .view({batch, -1, h * d_k});
  return {module.output_linear->forward(x), probabilities};
}

TEST(Textbook, MatchesTheChapterWithAPaddingMask) {
  torch::manual_seed(0);
  torchmha::TextbookMultiHeadAttention attention(4, 16);
  attention->to(torch::kFloat64);
  attention->eval();
  const auto x = torch::randn({2, 5, 16}, torch::kFloat64);
  auto mask = torch::ones({2, 1, 1, 5}, torch::kLong);
  mask.index_put_({1, 0, 0, torch::indexing::Slice(3)}, 0);
  const auto output = attention(x, x, x, mask);
  const auto [expected, expected_attn] = chapter_reference(*attention, x, x, x, mask);
  expect_close(output, expected, 1e-12);
  ASSERT_EQ(attention->attn.sizes(), (std::vector<int64_t>{2, 4, 5, 5}));
  expect_close(attention->attn, expected_attn, 1e-12);
}

TEST(Textbook, MatchesTheChapterWithACausalMaskAndCrossAttention) {
  torch::manual_seed(0);
  torchmha::TextbookMultiHeadAttention attention(2, 8);
  attention->to(torch::kFloat64);
  attention->eval();
  const auto query = torch::randn({3, 4, 8}, torch::kFloat64);
  const auto memory = torch::randn({3, 6, 8}, torch::kFloat64);
  const auto mask = torch::ones({4, 6}, torch::kBool).tril().view({1, 1, 4, 6});
  const auto output = attention(query, memory, memory, mask);
  expect_close(output, chapter_reference(*attention, query, memory, memory, mask).first, 1e-12);
}

TEST(Textbook, RejectsUnbatchedInput) {
  torchmha::TextbookMultiHeadAttention attention(2, 8);
  const auto x = torch::randn({4, 8});
  expect_error_containing([&] { attention(x, x, x); }, {"batch-first", "[4, 8]"});
}

class Errors : public ::testing::Test {
 protected:
  torchmha::MultiHeadAttention attention{16, 4};
  torch::Tensor x = torch::randn({5, 2, 16});
};

TEST_F(Errors, QueryRank) {
  const auto bad = torch::randn({1, 5, 2, 16});
  expect_error_containing([&] { attention(bad, bad, bad); }, {"`query`", "[1, 5, 2, 16]"});
}

TEST_F(Errors, KeyRankDiffersFromQuery) {
  const auto key = torch::randn({5, 16});
  expect_error_containing([&] { attention(x, key, key); }, {"`key`", "[5, 16]", "3-D"});
}

TEST_F(Errors, EmbedDimMismatch) {
  const auto bad = torch::randn({5, 2, 12});
  expect_error_containing([&] { attention(bad, bad, bad); }, {"embed_dim 16", "[5, 2, 12]"});
}

TEST_F(Errors, AttnMaskShape) {
  const auto mask = torch::zeros({5, 4}, torch::kBool);
  expect_error_containing([&] { attention->forward(x, x, x, {}, true, mask); },
                          {"`attn_mask`", "[5, 5]", "[5, 4]"});
}

TEST_F(Errors, KeyPaddingMaskShape) {
  const auto mask = torch::zeros({5, 2}, torch::kBool);
  expect_error_containing([&] { attention(x, x, x, mask); },
                          {"`key_padding_mask`", "[2, 5]", "[5, 2]"});
}

TEST_F(Errors, IntegerMask) {
  const auto mask = torch::zeros({2, 5}, torch::kLong);
  expect_error_containing([&] { attention(x, x, x, mask); }, {"key_padding_mask", "Long"});
}

TEST_F(Errors, DtypeMismatch) {
  const auto bad = x.to(torch::kFloat64);
  expect_error_containing([&] { attention(bad, bad, bad); }, {"dtype", "Double", "Float"});
}

TEST_F(Errors, BatchSizeMismatch) {
  const auto key = torch::randn({5, 3, 16});
  expect_error_containing([&] { attention(x, key, key); }, {"batch size", "[5, 3, 16]"});
}

TEST_F(Errors, KeyValueLengthMismatch) {
  const auto key = torch::randn({5, 2, 16});
  const auto value = torch::randn({6, 2, 16});
  expect_error_containing([&] { attention(x, key, value); }, {"`key`", "`value`", "[6, 2, 16]"});
}

TEST(OpErrors, WeightsGivenTwiceOrNotAtAll) {
  const auto x = torch::randn({3, 2, 8});
  const auto packed = torch::randn({24, 8});
  const auto square = torch::randn({8, 8});
  const auto call = [&](std::optional<torch::Tensor> in_proj, std::optional<torch::Tensor> q) {
    torchmha::multi_head_attention(x, x, x, 2, in_proj, std::nullopt, q, q, q, square, std::nullopt,
                                   std::nullopt, std::nullopt, false, 0.0, false, std::nullopt,
                                   std::nullopt, true, true, false, false);
  };
  expect_error_containing([&] { call(packed, square); }, {"in_proj_weight", "both"});
  expect_error_containing([&] { call(std::nullopt, std::nullopt); }, {"in_proj_weight", "neither"});
}

TEST(OpErrors, DropoutOutOfRangeAndHeads) {
  const auto x = torch::randn({3, 2, 8});
  const auto call = [&](int64_t heads, double dropout) {
    torchmha::multi_head_attention(x, x, x, heads, torch::randn({24, 8}), std::nullopt,
                                   std::nullopt, std::nullopt, std::nullopt, torch::randn({8, 8}),
                                   std::nullopt, std::nullopt, std::nullopt, false, dropout, true,
                                   std::nullopt, std::nullopt, true, true, false, false);
  };
  expect_error_containing([&] { call(2, -0.1); }, {"dropout_p", "-0.1"});
  expect_error_containing([&] { call(3, 0.0); }, {"embed_dim 8", "num_heads 3"});
  expect_error_containing([&] { call(0, 0.0); }, {"num_heads", "0"});
}

}  // namespace
