// The C++ module's grouped-query and rotary options: defaults, parameter shapes, refused values,
// printing, and that forward hands the options and `positions` to the op.
#include <torchmha/torchmha.h>

#include <limits>
#include <sstream>

#include "state_dict_files.h"
#include "test_helpers.h"

namespace {

using torchmha::MultiHeadAttentionOptions;
using torchmha::testing::expect_value_error_containing;

constexpr double kTolerance = 1e-12;

std::map<std::string, std::vector<int64_t>> parameter_shapes(const torch::nn::Module& module) {
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& parameter : module.named_parameters()) {
    shapes[parameter.key()] = parameter.value().sizes().vec();
  }
  return shapes;
}

// A float64 module with random parameters (the default zero biases would hide bias bugs).
torchmha::MultiHeadAttention random_module(const MultiHeadAttentionOptions& options) {
  torchmha::MultiHeadAttention attention(options);
  attention->to(torch::kFloat64);
  torch::NoGradGuard no_grad;
  for (auto& parameter : attention->parameters()) {
    parameter.copy_(torch::randn_like(parameter) * 0.5);
  }
  return attention;
}

std::string printed(const torchmha::MultiHeadAttention& attention) {
  std::ostringstream stream;
  stream << attention;
  return stream.str();
}

TEST(GroupedRotaryModule, NewOptionsDefaultToPlainMultiHeadAttention) {
  MultiHeadAttentionOptions options(16, 4);
  EXPECT_FALSE(options.num_kv_heads().has_value());
  EXPECT_FALSE(options.rope_theta().has_value());
  EXPECT_FALSE(options.rotary_dim().has_value());
  EXPECT_FALSE(options.rotary_interleaved());
  torchmha::MultiHeadAttention attention(options);
  EXPECT_EQ(attention->head_dim(), 4);
  EXPECT_EQ(attention->num_kv_heads(), 4);
  EXPECT_EQ(attention->kv_dim(), 16);
  // Nothing new in the printout at the defaults.
  EXPECT_EQ(printed(attention).find("num_kv_heads"), std::string::npos);
  EXPECT_EQ(printed(attention).find("rope_theta"), std::string::npos);
  EXPECT_EQ(printed(attention).find("rotary"), std::string::npos);
}

TEST(GroupedRotaryModule, PackedGroupedParameterShapes) {
  // head_dim 4, 2 key/value heads: kv_dim 8.
  torchmha::MultiHeadAttention attention(
      MultiHeadAttentionOptions(16, 4).num_kv_heads(2).add_bias_kv(true));
  const std::map<std::string, std::vector<int64_t>> expected{
      {"in_proj_weight", {32, 16}}, {"in_proj_bias", {32}}, {"out_proj.weight", {16, 16}},
      {"out_proj.bias", {16}},      {"bias_k", {1, 1, 8}},  {"bias_v", {1, 1, 8}}};
  EXPECT_EQ(parameter_shapes(*attention), expected);
  EXPECT_EQ(attention->num_kv_heads(), 2);
  EXPECT_EQ(attention->kv_dim(), 8);
}

TEST(GroupedRotaryModule, SeparateMultiQueryParameterShapes) {
  // One key/value head of head_dim 4, keys with 5 features and values with 3.
  torchmha::MultiHeadAttention attention(
      MultiHeadAttentionOptions(16, 4).num_kv_heads(1).kdim(5).vdim(3).rope_theta(500.0));
  const std::map<std::string, std::vector<int64_t>> expected{
      {"q_proj_weight", {16, 16}}, {"k_proj_weight", {4, 5}},     {"v_proj_weight", {4, 3}},
      {"in_proj_bias", {24}},      {"out_proj.weight", {16, 16}}, {"out_proj.bias", {16}}};
  EXPECT_EQ(parameter_shapes(*attention), expected);
}

TEST(GroupedRotaryModule, RotaryOptionsAddNoParameters) {
  torchmha::MultiHeadAttention plain(16, 4);
  torchmha::MultiHeadAttention rotary(
      MultiHeadAttentionOptions(16, 4).rope_theta(10000.0).rotary_dim(2).rotary_interleaved(true));
  EXPECT_EQ(parameter_shapes(*rotary), parameter_shapes(*plain));
}

TEST(GroupedRotaryModule, RefusesBadNumKvHeadsByName) {
  for (const int64_t bad : {0, -2}) {
    expect_value_error_containing(
        [&] { torchmha::MultiHeadAttention(MultiHeadAttentionOptions(16, 4).num_kv_heads(bad)); },
        {"`num_kv_heads`", "greater than 0", "got " + std::to_string(bad)});
  }
  expect_value_error_containing(
      [] { torchmha::MultiHeadAttention(MultiHeadAttentionOptions(16, 4).num_kv_heads(8)); },
      {"`num_kv_heads` (8)", "at most `num_heads` (4)"});
  expect_value_error_containing(
      [] { torchmha::MultiHeadAttention(MultiHeadAttentionOptions(24, 6).num_kv_heads(4)); },
      {"`num_kv_heads` (4)", "must divide `num_heads` (6)"});
}

TEST(GroupedRotaryModule, RefusesBadRopeThetaByName) {
  for (const double bad : {0.0, -10.0, std::numeric_limits<double>::infinity(),
                           std::numeric_limits<double>::quiet_NaN()}) {
    std::ostringstream value;
    value << bad;
    expect_value_error_containing(
        [&] { torchmha::MultiHeadAttention(MultiHeadAttentionOptions(16, 4).rope_theta(bad)); },
        {"`rope_theta`", "positive and finite", "got " + value.str()});
  }
}

TEST(GroupedRotaryModule, RefusesBadRotaryDimByName) {
  // head_dim is 4: odd, non-positive and larger values are refused.
  for (const int64_t bad : {3, 0, -2, 6}) {
    expect_value_error_containing(
        [&] {
          torchmha::MultiHeadAttention(
              MultiHeadAttentionOptions(16, 4).rope_theta(10000.0).rotary_dim(bad));
        },
        {"`rotary_dim`", "even", "at most head_dim", "= 4)", "got " + std::to_string(bad)});
  }
}

TEST(GroupedRotaryModule, RefusesRotaryDetailsWithoutRopeTheta) {
  expect_value_error_containing(
      [] { torchmha::MultiHeadAttention(MultiHeadAttentionOptions(16, 4).rotary_dim(2)); },
      {"`rotary_dim`=2", "needs `rope_theta`"});
  expect_value_error_containing(
      [] {
        torchmha::MultiHeadAttention(MultiHeadAttentionOptions(16, 4).rotary_interleaved(true));
      },
      {"`rotary_interleaved`=true", "needs `rope_theta`"});
}

TEST(GroupedRotaryModule, PrettyPrintShowsTheOptionsGiven) {
  torchmha::MultiHeadAttention attention(MultiHeadAttentionOptions(16, 4)
                                             .num_kv_heads(2)
                                             .rope_theta(10000.0)
                                             .rotary_dim(2)
                                             .rotary_interleaved(true));
  EXPECT_NE(printed(attention).find("torchmha::MultiHeadAttention(embed_dim=16, num_heads=4, "
                                    "dropout=0, bias=true, batch_first=false, num_kv_heads=2, "
                                    "rope_theta=10000, rotary_dim=2, rotary_interleaved=true)"),
            std::string::npos)
      << printed(attention);
  torchmha::MultiHeadAttention fractional(MultiHeadAttentionOptions(16, 4).rope_theta(0.1));
  EXPECT_NE(printed(fractional).find("batch_first=false, rope_theta=0.1)"), std::string::npos)
      << printed(fractional);
  torchmha::MultiHeadAttention large(MultiHeadAttentionOptions(16, 4).rope_theta(1e6));
  EXPECT_NE(printed(large).find("rope_theta=1000000)"), std::string::npos) << printed(large);
}

// A module with all num_heads key/value heads computing what the grouped module computes: each
// query head's key/value projection rows copied from the key/value head it shares.
torchmha::MultiHeadAttention expanded_equivalent(const torchmha::MultiHeadAttention& grouped) {
  auto options = grouped->options;
  options.num_kv_heads(std::nullopt);
  auto full = random_module(options);
  const auto embed_dim = options.embed_dim();
  const auto group = options.num_heads() / grouped->num_kv_heads();
  const auto expand_heads = [&](const torch::Tensor& rows) {
    // (kv_dim, ...) -> (num_kv_heads, head_dim, ...) -> each head repeated `group` times.
    auto by_head = rows.reshape({grouped->num_kv_heads(), grouped->head_dim(), -1});
    return by_head.repeat_interleave(group, 0).reshape({embed_dim, -1}).squeeze(-1);
  };
  torch::NoGradGuard no_grad;
  const auto kv_dim = grouped->kv_dim();
  const auto q = grouped->in_proj_weight.narrow(0, 0, embed_dim);
  const auto k = grouped->in_proj_weight.narrow(0, embed_dim, kv_dim);
  const auto v = grouped->in_proj_weight.narrow(0, embed_dim + kv_dim, kv_dim);
  full->in_proj_weight.copy_(torch::cat({q, expand_heads(k), expand_heads(v)}));
  const auto bias = grouped->in_proj_bias;
  full->in_proj_bias.copy_(
      torch::cat({bias.narrow(0, 0, embed_dim), expand_heads(bias.narrow(0, embed_dim, kv_dim)),
                  expand_heads(bias.narrow(0, embed_dim + kv_dim, kv_dim))}));
  full->out_proj->weight.copy_(grouped->out_proj->weight);
  full->out_proj->bias.copy_(grouped->out_proj->bias);
  return full;
}

TEST(GroupedRotaryModule, GroupedForwardEqualsRepeatedKeyValueHeads) {
  torch::manual_seed(0);
  for (const bool rotary : {false, true}) {
    SCOPED_TRACE(rotary ? "rotary" : "no rotary");
    auto options = MultiHeadAttentionOptions(16, 4).num_kv_heads(2);
    if (rotary) {
      options.rope_theta(100.0).rotary_dim(2).rotary_interleaved(true);
    }
    auto grouped = random_module(options);
    auto full = expanded_equivalent(grouped);
    const auto x = torch::randn({5, 3, 16}, torch::kFloat64);
    // Positions need rotary embeddings; without them the default (none) is the only one.
    const auto positions = rotary ? torch::randint(0, 50, {3, 5}, torch::kInt64) : torch::Tensor();
    const auto [output, weights] = grouped->forward(x, x, x, {}, true, {}, false, true, positions);
    const auto [expected_output, expected_weights] =
        full->forward(x, x, x, {}, true, {}, false, true, positions);
    torchmha::testing::expect_close(output, expected_output, kTolerance);
    torchmha::testing::expect_close(weights, expected_weights, kTolerance);
    EXPECT_EQ(weights.sizes(), (std::vector<int64_t>{3, 4, 5, 5}));
  }
}

TEST(GroupedRotaryModule, RotaryAtPositionZeroIsNoRotation) {
  torch::manual_seed(1);
  auto rotary = random_module(
      MultiHeadAttentionOptions(16, 4).num_kv_heads(2).rope_theta(10000.0).batch_first(true));
  auto plain = random_module(MultiHeadAttentionOptions(16, 4).num_kv_heads(2).batch_first(true));
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : plain->named_parameters()) {
      parameter.value().copy_(rotary->named_parameters()[parameter.key()]);
    }
  }
  const auto x = torch::randn({2, 6, 16}, torch::kFloat64);
  const auto zeros = torch::zeros({2, 6}, torch::kInt64);
  const auto [rotated, rotated_weights] =
      rotary->forward(x, x, x, {}, true, {}, true, false, zeros);
  const auto [expected, expected_weights] = plain->forward(x, x, x);
  torchmha::testing::expect_close(rotated, expected, kTolerance);
  torchmha::testing::expect_close(rotated_weights, expected_weights, kTolerance);
  // The default positions 0..L-1 do rotate: the options reach the op.
  const auto [default_positions, unused] = rotary->forward(x, x, x);
  EXPECT_GT((default_positions - expected).abs().max().item<double>(), 1e-3);
}

TEST(GroupedRotaryModule, PositionsReachTheOp) {
  torch::manual_seed(2);
  auto attention = random_module(MultiHeadAttentionOptions(16, 4).rope_theta(10000.0));
  const auto x = torch::randn({5, 2, 16}, torch::kFloat64);
  const auto counting = torch::arange(5, torch::kInt64);
  const auto [by_default, default_weights] = attention->forward(x, x, x);
  const auto [counted, counted_weights] =
      attention->forward(x, x, x, {}, true, {}, true, false, counting);
  torchmha::testing::expect_close(counted, by_default, kTolerance);
  // Scores depend on position differences only: shifting every position changes nothing ...
  const auto [shifted, shifted_weights] =
      attention->forward(x, x, x, {}, true, {}, true, false, counting + 7);
  torchmha::testing::expect_close(shifted, by_default, kTolerance);
  torchmha::testing::expect_close(shifted_weights, default_weights, kTolerance);
  // ... while spreading them apart does.
  const auto [spread, spread_weights] =
      attention->forward(x, x, x, {}, true, {}, true, false, counting * 3);
  EXPECT_GT((spread_weights - default_weights).abs().max().item<double>(), 1e-3);
}

TEST(GroupedRotaryModule, AnyModuleForwardKeepsDefaultsAndTakesPositions) {
  torch::manual_seed(3);
  auto attention = random_module(MultiHeadAttentionOptions(16, 4).rope_theta(10000.0));
  torch::nn::AnyModule any(attention);
  const auto x = torch::randn({4, 2, 16}, torch::kFloat64);
  using Result = std::tuple<torch::Tensor, torch::Tensor>;
  const auto [by_default, unused] = any.forward<Result>(x, x, x);
  torchmha::testing::expect_close(by_default, std::get<0>(attention->forward(x, x, x)), 0.0);
  const auto positions = torch::tensor({3, 1, 4, 1}, torch::kInt64);
  const auto [positioned, weights] =
      any.forward<Result>(x, x, x, torch::Tensor(), true, torch::Tensor(), true, false, positions);
  const auto [expected, expected_weights] =
      attention->forward(x, x, x, {}, true, {}, true, false, positions);
  torchmha::testing::expect_close(positioned, expected, 0.0);
  EXPECT_GT((positioned - by_default).abs().max().item<double>(), 1e-3);
}

TEST(GroupedRotaryModule, PositionsOfTheWrongShapeAreRefusedByName) {
  auto attention = random_module(MultiHeadAttentionOptions(16, 4).rope_theta(10000.0));
  const auto x = torch::randn({4, 2, 16}, torch::kFloat64);
  torchmha::testing::expect_error_containing(
      [&] {
        attention->forward(x, x, x, {}, true, {}, true, false, torch::zeros({2, 5}, torch::kInt64));
      },
      {"torchmha.multi_head_attention: ", "`positions`"});
}

TEST(GroupedRotaryModule, FullHeadStateDictIntoGroupedModuleIsRefusedByKey) {
  torchmha::testing::TempFile file("full_heads.pt");
  torchmha::save_state_dict(*torchmha::MultiHeadAttention(16, 4), file.path());
  torchmha::MultiHeadAttention grouped(MultiHeadAttentionOptions(16, 4).num_kv_heads(2));
  const auto before = torchmha::testing::snapshot(*grouped);
  torchmha::testing::expect_error_containing(
      [&] { torchmha::load_state_dict(*grouped, file.path()); },
      {"\"in_proj_weight\" has shape [48, 16]", "but the module's is [32, 16]"});
  EXPECT_TRUE(torchmha::testing::has_values(*grouped, before));
}

}  // namespace
