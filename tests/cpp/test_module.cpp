// Construction, options, parameters, printing and cloning of the C++ modules.
#include <torchmha/torchmha.h>

#include <sstream>

#include "test_helpers.h"

namespace {

std::map<std::string, std::vector<int64_t>> parameter_shapes(const torch::nn::Module& module) {
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& parameter : module.named_parameters()) {
    shapes[parameter.key()] = parameter.value().sizes().vec();
  }
  return shapes;
}

TEST(MultiHeadAttentionModule, DefaultOptionsMirrorPyTorch) {
  torchmha::MultiHeadAttentionOptions options(16, 4);
  EXPECT_EQ(options.embed_dim(), 16);
  EXPECT_EQ(options.num_heads(), 4);
  EXPECT_EQ(options.dropout(), 0.0);
  EXPECT_TRUE(options.bias());
  EXPECT_FALSE(options.add_bias_kv());
  EXPECT_FALSE(options.add_zero_attn());
  EXPECT_EQ(options.kdim(), 16);
  EXPECT_EQ(options.vdim(), 16);
  EXPECT_FALSE(options.batch_first());
}

TEST(MultiHeadAttentionModule, PackedParameterNamesAndShapes) {
  torchmha::MultiHeadAttention attention(16, 4);
  const std::map<std::string, std::vector<int64_t>> expected{{"in_proj_weight", {48, 16}},
                                                             {"in_proj_bias", {48}},
                                                             {"out_proj.weight", {16, 16}},
                                                             {"out_proj.bias", {16}}};
  EXPECT_EQ(parameter_shapes(*attention), expected);
  EXPECT_TRUE(attention->qkv_same_embed_dim);
}

TEST(MultiHeadAttentionModule, SeparateWeightsWithoutBiasWithBiasKv) {
  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(8, 2).kdim(5).vdim(3).bias(false).add_bias_kv(true));
  const std::map<std::string, std::vector<int64_t>> expected{
      {"q_proj_weight", {8, 8}},   {"k_proj_weight", {8, 5}}, {"v_proj_weight", {8, 3}},
      {"out_proj.weight", {8, 8}}, {"bias_k", {1, 1, 8}},     {"bias_v", {1, 1, 8}}};
  EXPECT_EQ(parameter_shapes(*attention), expected);
  EXPECT_FALSE(attention->qkv_same_embed_dim);
}

TEST(MultiHeadAttentionModule, InitialisationMatchesPyTorch) {
  torchmha::MultiHeadAttention attention(32, 4);
  // Biases start at zero; xavier_uniform_ bounds the packed weight by sqrt(6 / (fan_in + fan_out)).
  EXPECT_EQ(attention->in_proj_bias.abs().max().item<float>(), 0.0f);
  EXPECT_EQ(attention->out_proj->bias.abs().max().item<float>(), 0.0f);
  const double bound = std::sqrt(6.0 / (32 + 96));
  EXPECT_LE(attention->in_proj_weight.abs().max().item<double>(), bound);
  EXPECT_GT(attention->in_proj_weight.abs().max().item<double>(), 0.5 * bound);
}

TEST(MultiHeadAttentionModule, PrettyPrint) {
  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(16, 4).dropout(0.25).batch_first(true));
  std::ostringstream stream;
  stream << attention;
  EXPECT_NE(stream.str().find("torchmha::MultiHeadAttention(embed_dim=16, num_heads=4, "
                              "dropout=0.25, bias=true, batch_first=true)"),
            std::string::npos)
      << stream.str();
  EXPECT_NE(stream.str().find("(out_proj): torch::nn::Linear"), std::string::npos);
}

TEST(MultiHeadAttentionModule, CloneIsADeepCopy) {
  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(8, 2).add_bias_kv(true));
  auto copy = std::dynamic_pointer_cast<torchmha::MultiHeadAttentionImpl>(attention->clone());
  ASSERT_TRUE(copy);
  const auto original = attention->named_parameters();
  const auto cloned = copy->named_parameters();
  ASSERT_EQ(original.size(), cloned.size());
  for (const auto& parameter : original) {
    const auto& twin = cloned[parameter.key()];
    EXPECT_TRUE(torch::equal(parameter.value(), twin)) << parameter.key();
    EXPECT_NE(parameter.value().data_ptr(), twin.data_ptr()) << parameter.key();
  }
  torch::NoGradGuard no_grad;
  copy->in_proj_weight.fill_(1.0);
  EXPECT_FALSE(torch::equal(attention->in_proj_weight, copy->in_proj_weight));
}

TEST(MultiHeadAttentionModule, RejectsBadOptions) {
  using torchmha::MultiHeadAttentionOptions;
  torchmha::testing::expect_error_containing(
      [] { torchmha::MultiHeadAttention(MultiHeadAttentionOptions(10, 3)); },
      {"embed_dim 10", "num_heads 3"});
  torchmha::testing::expect_error_containing(
      [] { torchmha::MultiHeadAttention(MultiHeadAttentionOptions(8, 0)); }, {"num_heads=0"});
  torchmha::testing::expect_error_containing(
      [] { torchmha::MultiHeadAttention(MultiHeadAttentionOptions(8, 2).dropout(1.5)); },
      {"dropout", "1.5"});
}

TEST(TextbookModule, ChapterParameterNames) {
  torchmha::TextbookMultiHeadAttention attention(4, 16);
  const std::map<std::string, std::vector<int64_t>> expected{
      {"linear_layers.0.weight", {16, 16}}, {"linear_layers.0.bias", {16}},
      {"linear_layers.1.weight", {16, 16}}, {"linear_layers.1.bias", {16}},
      {"linear_layers.2.weight", {16, 16}}, {"linear_layers.2.bias", {16}},
      {"output_linear.weight", {16, 16}},   {"output_linear.bias", {16}}};
  EXPECT_EQ(parameter_shapes(*attention), expected);
  EXPECT_EQ(attention->options.dropout(), 0.1);
  std::ostringstream stream;
  stream << attention;
  EXPECT_NE(stream.str().find("torchmha::TextbookMultiHeadAttention(h=4, d_model=16, dropout=0.1)"),
            std::string::npos);
}

TEST(Library, VersionAndOpRegistration) {
  EXPECT_STREQ(torchmha::version(), "0.1.0");
  const auto schema =
      c10::Dispatcher::singleton().findSchema({"torchmha::multi_head_attention", ""});
  ASSERT_TRUE(schema.has_value());
}

}  // namespace
