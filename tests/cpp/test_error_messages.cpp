// The op's first error messages, from the module and from the op; test_bad_inputs.cpp has the rest.
#include <torchmha/torchmha.h>

#include "test_helpers.h"

namespace {

using torchmha::testing::expect_error_containing;

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
