// The chapter's adapter (TextbookMultiHeadAttention) against the chapter's formula.
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

}  // namespace
