// The catalogue of bad inputs: each one gets a c10::Error naming the argument and its shape,
// never a crash or a silent answer. Empty and non-finite inputs behave like LibTorch's module.
// (test_error_messages.cpp holds the first messages; these cases are the rest.)
#include <torchmha/torchmha.h>

#include <array>
#include <limits>

#include "test_helpers.h"

namespace {

using torchmha::testing::expect_error_containing;
using torchmha::testing::expect_value_error_containing;

constexpr int64_t kEmbedDim = 8;
constexpr int64_t kHeads = 2;

// Every argument of the op with a valid default (self-attention, L = 5, N = 2, E = 8), so a test
// changes exactly the one argument it is about.
struct OpCall {
  torch::Tensor query = torch::randn({5, 2, kEmbedDim});
  torch::Tensor key = query;
  torch::Tensor value = query;
  int64_t num_heads = kHeads;
  std::optional<torch::Tensor> in_proj_weight = torch::randn({3 * kEmbedDim, kEmbedDim});
  std::optional<torch::Tensor> in_proj_bias = torch::randn({3 * kEmbedDim});
  std::optional<torch::Tensor> q_proj_weight, k_proj_weight, v_proj_weight;
  torch::Tensor out_proj_weight = torch::randn({kEmbedDim, kEmbedDim});
  std::optional<torch::Tensor> out_proj_bias = torch::randn({kEmbedDim});
  std::optional<torch::Tensor> bias_k, bias_v;
  bool add_zero_attn = false;
  double dropout_p = 0.0;
  bool training = true;
  std::optional<torch::Tensor> key_padding_mask, attn_mask;
  bool need_weights = true;

  std::tuple<torch::Tensor, torch::Tensor> operator()() const {
    return torchmha::multi_head_attention(
        query, key, value, num_heads, in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight,
        v_proj_weight, out_proj_weight, out_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p,
        training, key_padding_mask, attn_mask, need_weights, /*average_attn_weights=*/true,
        /*is_causal=*/false, /*batch_first=*/false);
  }
  // Separate projection weights for key features `kdim` and value features `vdim`.
  void use_separate_weights(int64_t kdim, int64_t vdim) {
    in_proj_weight.reset();
    q_proj_weight = torch::randn({kEmbedDim, kEmbedDim});
    k_proj_weight = torch::randn({kEmbedDim, kdim});
    v_proj_weight = torch::randn({kEmbedDim, vdim});
    key = torch::randn({5, 2, kdim});
    value = torch::randn({5, 2, vdim});
  }
};

TEST(BadRanks, QueryOfOneOrZeroDimensions) {
  OpCall call;
  call.query = call.key = call.value = torch::randn({kEmbedDim});
  expect_error_containing(call, {"`query`", "2-D", "3-D", "[8]"});
  call.query = call.key = call.value = torch::tensor(1.0);
  expect_error_containing(call, {"`query`", "of shape []"});
}

TEST(BadRanks, ValueRankDiffersFromQuery) {
  OpCall call;
  call.value = torch::randn({5, kEmbedDim});
  expect_error_containing(call, {"`value` of shape [5, 8]", "3-D like `query`"});
}

TEST(BadEmbedDim, NonSquareOutputProjection) {
  OpCall call;
  call.out_proj_weight = torch::randn({kEmbedDim, kEmbedDim + 1});
  expect_error_containing(call, {"`out_proj_weight`", "[8, 9]"});
}

TEST(BadEmbedDim, PackedInputProjectionOfWrongShape) {
  OpCall call;
  call.in_proj_weight = torch::randn({3 * kEmbedDim, kEmbedDim + 1});
  expect_error_containing(call, {"`in_proj_weight`", "[24, 8]", "but got [24, 9]"});
}

TEST(BadEmbedDim, BiasesOfWrongShape) {
  OpCall call;
  call.in_proj_bias = torch::randn({kEmbedDim});
  expect_error_containing(call, {"`in_proj_bias`", "[24]", "but got [8]"});
  call = OpCall();
  call.out_proj_bias = torch::randn({kEmbedDim, 1});
  expect_error_containing(call, {"`out_proj_bias`", "[8]", "but got [8, 1]"});
}

TEST(BadEmbedDim, KeyFeaturesDifferWithPackedWeights) {
  OpCall call;
  call.key = call.value = torch::randn({5, 2, 6});
  expect_error_containing(call, {"`in_proj_weight`", "`key` of shape [5, 2, 6]", "kdim/vdim"});
}

TEST(BadEmbedDim, ZeroIsAValueError) {
  OpCall call;
  call.query = call.key = call.value = torch::randn({5, 2, 0});
  call.in_proj_weight = torch::randn({0, 0});
  call.in_proj_bias = torch::randn({0});
  call.out_proj_weight = torch::randn({0, 0});
  call.out_proj_bias = torch::randn({0});
  expect_value_error_containing(call, {"embed_dim", "[5, 2, 0]", "must be positive"});
}

TEST(BadNumHeads, NotDividingEmbedDimIsAValueError) {
  OpCall call;
  call.num_heads = 3;
  expect_value_error_containing(call, {"embed_dim 8", "not divisible by num_heads 3"});
  call.num_heads = 16;
  expect_value_error_containing(call, {"embed_dim 8", "not divisible by num_heads 16"});
}

TEST(BadNumHeads, ZeroOrNegativeIsAValueError) {
  for (const int64_t heads : {int64_t{0}, int64_t{-2}, std::numeric_limits<int64_t>::min()}) {
    OpCall call;
    call.num_heads = heads;
    expect_value_error_containing(call, {"`num_heads` must be positive", std::to_string(heads)});
  }
}

TEST(BadKdimVdim, KeyOrValueFeaturesDifferFromTheirWeights) {
  OpCall call;
  call.use_separate_weights(3, 5);
  call.key = torch::randn({5, 2, 4});
  expect_error_containing(call, {"`k_proj_weight`", "[8, 4]", "but got [8, 3]"});
  call.use_separate_weights(3, 5);
  call.value = torch::randn({5, 2, 3});
  expect_error_containing(call, {"`v_proj_weight`", "[8, 3]", "but got [8, 5]"});
  call.use_separate_weights(3, 5);
  call.q_proj_weight = torch::randn({kEmbedDim, 3});
  expect_error_containing(call, {"`q_proj_weight`", "[8, 8]", "but got [8, 3]"});
}

TEST(BadKdimVdim, SomeSeparateWeightsMissing) {
  OpCall call;
  call.use_separate_weights(3, 5);
  call.v_proj_weight.reset();
  expect_error_containing(call, {"`q_proj_weight`", "`k_proj_weight`", "`v_proj_weight`"});
}

TEST(BadKdimVdim, ModuleGetsKeyOfWrongFeatureSize) {
  torchmha::MultiHeadAttention attention(torchmha::MultiHeadAttentionOptions(8, 2).kdim(3).vdim(5));
  const auto query = torch::randn({4, 2, 8});
  expect_error_containing(
      [&] {
        attention(query, torch::randn({6, 2, 4}), torch::randn({6, 2, 5}));
      },
      {"`k_proj_weight`", "[8, 4]", "but got [8, 3]"});
}

TEST(BadMasks, IntegerAttnMasks) {
  for (const auto dtype : {torch::kInt, torch::kByte, torch::kLong}) {
    OpCall call;
    call.attn_mask = torch::zeros({5, 5}, dtype);
    expect_error_containing(call, {"`attn_mask`", "bool and floating", c10::toString(dtype)});
  }
}

TEST(BadMasks, AttnMaskWithTooManyOrTooFewDims) {
  OpCall call;
  call.attn_mask = torch::zeros({2, kHeads, 5, 5}, torch::kBool);
  expect_error_containing(call, {"`attn_mask`", "[5, 5]", "[4, 5, 5]", "but got [2, 2, 5, 5]"});
  call.attn_mask = torch::zeros({5}, torch::kBool);
  expect_error_containing(call, {"`attn_mask`", "but got [5]"});
}

TEST(BadMasks, AttnMaskWithWrongGroupCount) {
  OpCall call;
  call.attn_mask = torch::zeros({kHeads, 5, 5}, torch::kBool);  // batch * heads = 4 expected
  expect_error_containing(
      call, {"`attn_mask`", "[batch * num_heads, L, S] = [4, 5, 5]", "but got [2, 5, 5]"});
}

TEST(BadMasks, KeyPaddingMaskOfWrongShape) {
  OpCall call;
  call.key_padding_mask = torch::zeros({2, 5, 1}, torch::kBool);
  expect_error_containing(call, {"`key_padding_mask`", "[2, 5]", "but got [2, 5, 1]"});
  call.key_padding_mask = torch::zeros({5}, torch::kBool);
  expect_error_containing(call, {"`key_padding_mask`", "[2, 5]", "but got [5]"});
  call.query = call.key = call.value = torch::randn({5, kEmbedDim});
  call.key_padding_mask = torch::zeros({1, 5}, torch::kBool);
  expect_error_containing(call, {"`key_padding_mask`", "unbatched", "[5]", "but got [1, 5]"});
}

TEST(BadMasks, IntegerKeyPaddingMask) {
  OpCall call;
  call.key_padding_mask = torch::zeros({2, 5}, torch::kInt);
  expect_error_containing(call, {"`key_padding_mask`", "Int"});
}

TEST(BadMasks, SparseMask) {
  OpCall call;
  call.attn_mask = torch::zeros({5, 5}).to_sparse();
  expect_error_containing(call, {"dense `attn_mask`", "Sparse"});
}

// CUDA and CPU tensors are compared by the same device checks; `meta` stands in for CUDA here.
TEST(BadDevices, InputsWeightsAndMasksOnAnotherDevice) {
  const auto meta = torch::Device(torch::kMeta);
  OpCall call;
  call.key = call.value = call.query.to(meta);
  expect_error_containing(call, {"`key`", "device of `query` (cpu)", "meta"});
  call = OpCall();
  call.query = call.query.to(meta);
  expect_error_containing(call, {"`in_proj_weight`", "device of `query` (meta)", "cpu"});
  call = OpCall();
  call.out_proj_weight = call.out_proj_weight.to(meta);
  expect_error_containing(call, {"`out_proj_weight`", "meta"});
  call = OpCall();
  call.attn_mask = torch::zeros({5, 5}, torch::TensorOptions(torch::kBool).device(meta));
  expect_error_containing(call, {"`attn_mask`", "meta"});
  call = OpCall();
  call.key_padding_mask = torch::zeros({2, 5}, torch::TensorOptions(torch::kBool).device(meta));
  expect_error_containing(call, {"`key_padding_mask`", "meta"});
}

TEST(BadDtypes, KeyAndWeightsOfAnotherDtype) {
  OpCall call;
  call.key = call.value = call.query.to(torch::kFloat64);
  expect_error_containing(call, {"`key`", "dtype of `query` (Float)", "Double"});
  call = OpCall();
  call.in_proj_bias = call.in_proj_bias->to(torch::kBFloat16);
  expect_error_containing(call, {"`in_proj_bias`", "BFloat16"});
}

TEST(BadDtypes, IntegerAndComplexQuery) {
  for (const auto dtype : {torch::kLong, torch::kComplexFloat}) {
    OpCall call;
    call.query = call.key = call.value = call.query.to(dtype);
    expect_error_containing(call, {"floating point `query`", c10::toString(dtype)});
  }
}

TEST(BadLayouts, SparseAndNestedQuery) {
  OpCall call;
  call.query = call.key = call.value = call.query.to_sparse();
  expect_error_containing(call, {"dense `query`", "Sparse"});
  call = OpCall();
  call.key = call.value =
      torch::nested::nested_tensor({torch::randn({3, kEmbedDim}), torch::randn({4, kEmbedDim})});
  expect_error_containing(call, {"dense `key`", "nested"});
}

// Weights and biases are refused by name as inputs are, whatever other layout they come in.
TEST(BadLayouts, SparseAndMkldnnWeightsAndBiases) {
  using Layout = std::pair<const char*, torch::Tensor (*)(const torch::Tensor&)>;
  const Layout layouts[] = {
      {"Sparse", [](const torch::Tensor& t) { return t.to_sparse(); }},
      {"Mkldnn", [](const torch::Tensor& t) { return t.to_mkldnn(); }},
  };
  for (const auto& [layout, convert] : layouts) {
    const auto refused = [&, layout = layout](const OpCall& call, const std::string& name) {
      expect_error_containing(call, {"dense `" + name + "`", layout});
    };
    OpCall call;
    call.in_proj_weight = convert(*call.in_proj_weight);
    refused(call, "in_proj_weight");
    call = OpCall();
    call.in_proj_bias = convert(*call.in_proj_bias);
    refused(call, "in_proj_bias");
    call = OpCall();
    call.out_proj_weight = convert(call.out_proj_weight);
    refused(call, "out_proj_weight");
    call = OpCall();
    call.out_proj_bias = convert(*call.out_proj_bias);
    refused(call, "out_proj_bias");
    for (const auto* name : {"bias_k", "bias_v"}) {
      call = OpCall();
      call.bias_k = torch::randn({1, 1, kEmbedDim});
      call.bias_v = torch::randn({1, 1, kEmbedDim});
      auto& bias = std::string(name) == "bias_k" ? call.bias_k : call.bias_v;
      bias = convert(*bias);
      refused(call, name);
    }
    for (const auto* name : {"q_proj_weight", "k_proj_weight", "v_proj_weight"}) {
      call = OpCall();
      call.use_separate_weights(3, 5);
      auto& weight = name[0] == 'q'   ? call.q_proj_weight
                     : name[0] == 'k' ? call.k_proj_weight
                                      : call.v_proj_weight;
      weight = convert(*weight);
      refused(call, name);
    }
  }
}

// An undefined C++ tensor is not a tensor of shape [0]: the message says it is undefined.
TEST(UndefinedTensors, RequiredTensorsAreReportedAsUndefined) {
  const std::pair<const char*, torch::Tensor OpCall::*> required[] = {
      {"query", &OpCall::query},
      {"key", &OpCall::key},
      {"value", &OpCall::value},
      {"out_proj_weight", &OpCall::out_proj_weight}};
  for (const auto& [name, member] : required) {
    OpCall call;
    call.*member = torch::Tensor();
    expect_error_containing(
        call, {std::string("expected a defined `") + name + "`", "but got an undefined tensor"});
  }
}

TEST(UndefinedTensors, ModulesReportThemAsUndefined) {
  const auto x = torch::randn({2, 5, kEmbedDim});
  torchmha::MultiHeadAttention attention(kEmbedDim, kHeads);
  expect_error_containing([&] { attention(torch::Tensor(), x, x); },
                          {"defined `query`", "undefined tensor"});
  torchmha::TextbookMultiHeadAttention textbook(kHeads, kEmbedDim);
  expect_error_containing([&] { textbook(x, x, torch::Tensor()); },
                          {"defined `value`", "undefined tensor"});
}

// A chapter mask of rank 4 or less whose sizes do not broadcast to (B, h, L, S) is named, not left
// to expand()'s message.
TEST(BadTextbookMask, SizesThatDoNotBroadcastAreRefusedByName) {
  torchmha::TextbookMultiHeadAttention textbook(kHeads, kEmbedDim);
  const auto query = torch::randn({2, 4, kEmbedDim});
  const auto memory = torch::randn({2, 6, kEmbedDim});
  for (const auto& shape : std::vector<std::vector<int64_t>>{
           {2, 1, 4, 7}, {2, kHeads, 3, 6}, {3, 1, 1, 6}, {kHeads + 1, 4, 6}}) {
    expect_error_containing(
        [&] { textbook(query, memory, memory, torch::ones(shape)); },
        {"`mask` broadcastable to (B, h, L, S) = (2, " + std::to_string(kHeads) + ", 4, 6)",
         c10::str(at::IntArrayRef(shape))});
  }
}

// 3 * embed_dim sizes the packed projection: an embed_dim near 2^62 would overflow it.
TEST(BadEmbedDim, TooLargeForThreeTimesItIsAValueError) {
  constexpr int64_t kHuge = int64_t{1} << 62;
  expect_value_error_containing(
      [] { torchmha::MultiHeadAttention(torchmha::MultiHeadAttentionOptions(kHuge, 1)); },
      {"embed_dim=" + std::to_string(kHuge), "too large", "3 * embed_dim"});
  OpCall call;
  call.num_heads = 1;
  // A view of one element: the op sees the size without any memory behind it.
  call.query = call.key = call.value = torch::zeros({1, 1, 1}).expand({1, 1, kHuge});
  expect_value_error_containing(
      call, {"embed_dim " + std::to_string(kHuge), "`query` [1, 1, " + std::to_string(kHuge) + "]",
             "too large"});
}

TEST(BadDropout, OutsideZeroOneIsAValueError) {
  for (const double dropout : {-0.5, 1.5, std::numeric_limits<double>::quiet_NaN(),
                               std::numeric_limits<double>::infinity()}) {
    OpCall call;
    call.dropout_p = dropout;
    expect_value_error_containing(call, {"`dropout_p` must be in [0, 1]"});
  }
}

// Printed with the digits that set it apart from 1, not rounded to six digits ("got 1").
TEST(BadDropout, JustAboveOneIsPrintedAsGiven) {
  OpCall call;
  call.dropout_p = 1.0000001;
  expect_value_error_containing(call, {"but got 1.0000001"});
  expect_value_error_containing(
      [] {
        torchmha::MultiHeadAttention(torchmha::MultiHeadAttentionOptions(8, 2).dropout(1.0000001));
      },
      {"dropout", "got 1.0000001"});
  expect_value_error_containing(
      [] {
        torchmha::TextbookMultiHeadAttention(
            torchmha::TextbookMultiHeadAttentionOptions(2, 8).dropout(1.0000001));
      },
      {"dropout", "got 1.0000001"});
}

TEST(BadDropout, OneDropsEveryProbability) {
  OpCall call;
  call.dropout_p = 1.0;
  for (const bool need_weights : {true, false}) {
    call.need_weights = need_weights;
    const auto output = std::get<0>(call());
    // No attention survives, so only the output projection's bias remains.
    EXPECT_TRUE(torch::equal(output, call.out_proj_bias->expand_as(output))) << need_weights;
  }
}

TEST(BadBiasKv, OnlyOneOrOfWrongShape) {
  OpCall call;
  call.bias_k = torch::randn({1, 1, kEmbedDim});
  expect_error_containing(call, {"`bias_k` and `bias_v` go together", "only `bias_k`"});
  call.bias_v = torch::randn({2, kEmbedDim / 2});
  expect_error_containing(call, {"`bias_v`", "[1, 1, 8]", "but got [2, 4]"});
}

TEST(BadModuleOptions, EachIsAValueError) {
  using Options = torchmha::MultiHeadAttentionOptions;
  expect_value_error_containing([] { torchmha::MultiHeadAttention(Options(0, 2)); },
                                {"embed_dim=0"});
  expect_value_error_containing([] { torchmha::MultiHeadAttention(Options(8, -1)); },
                                {"num_heads=-1"});
  expect_value_error_containing([] { torchmha::MultiHeadAttention(Options(8, 3)); },
                                {"divisible by num_heads 3"});
  expect_value_error_containing([] { torchmha::MultiHeadAttention(Options(8, 2).kdim(0)); },
                                {"kdim=0"});
  expect_value_error_containing([] { torchmha::MultiHeadAttention(Options(8, 2).dropout(1.5)); },
                                {"dropout", "1.5"});
}

// LibTorch's own module with the same weights: the reference for "behaves like PyTorch".
struct ReferencePair {
  torchmha::MultiHeadAttention ours{kEmbedDim, kHeads};
  torch::nn::MultiheadAttention reference{kEmbedDim, kHeads};
  ReferencePair() {
    torch::NoGradGuard no_grad;
    auto reference_parameters = reference->named_parameters();
    for (auto& parameter : ours->named_parameters()) {
      parameter.value().normal_();
      reference_parameters[parameter.key()].copy_(parameter.value());
    }
  }
};

TEST(EmptyInputs, BatchOrSequenceOfZero) {
  // PyTorch's shapes (test_bad_inputs.py compares with torch.nn.MultiheadAttention; LibTorch's
  // C++ module itself fails on batch 0).
  torchmha::MultiHeadAttention attention(kEmbedDim, kHeads);
  using Shape = std::vector<int64_t>;
  const std::array<Shape, 4> cases[] = {
      // query, key, output, weights
      {Shape{5, 0, kEmbedDim}, Shape{4, 0, kEmbedDim}, Shape{5, 0, kEmbedDim}, Shape{0, 5, 4}},
      {Shape{0, 2, kEmbedDim}, Shape{4, 2, kEmbedDim}, Shape{0, 2, kEmbedDim}, Shape{2, 0, 4}},
      {Shape{0, 0, kEmbedDim}, Shape{0, 0, kEmbedDim}, Shape{0, 0, kEmbedDim}, Shape{0, 0, 0}},
      {Shape{0, kEmbedDim}, Shape{0, kEmbedDim}, Shape{0, kEmbedDim}, Shape{0, 0}},
  };
  for (const auto& [query_shape, key_shape, output_shape, weights_shape] : cases) {
    const auto query = torch::randn(query_shape);
    const auto key = torch::randn(key_shape);
    for (const bool need_weights : {true, false}) {
      const auto [output, weights] = attention->forward(query, key, key, {}, need_weights);
      EXPECT_EQ(output.sizes(), output_shape);
      if (need_weights) {
        EXPECT_EQ(weights.sizes(), weights_shape);
      }
    }
  }
}

TEST(EmptyInputs, NoKeysGiveZeroAttention) {
  ReferencePair pair;
  const auto query = torch::randn({5, 2, kEmbedDim});
  const auto key = torch::randn({0, 2, kEmbedDim});
  for (const bool need_weights : {true, false}) {
    const auto [output, weights] = pair.ours->forward(query, key, key, {}, need_weights);
    // Attention over no keys is zero, so the output is the output projection's bias.
    EXPECT_TRUE(torch::allclose(output, pair.ours->out_proj->bias.expand({5, 2, kEmbedDim})));
    if (need_weights) {
      EXPECT_EQ(weights.sizes(), (std::vector<int64_t>{2, 5, 0}));
    }
  }
}

TEST(NonFiniteInputs, NanAndInfSpreadAsInLibTorch) {
  ReferencePair pair;
  const auto x = torch::randn({5, 2, kEmbedDim});
  for (const double bad :
       {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
        -std::numeric_limits<double>::infinity()}) {
    auto query = x.clone();
    query.index_put_({1, 0, 3}, bad);
    auto key = x.clone();
    key.index_put_({2, 1, 0}, bad);
    for (const auto& [q, k] : {std::pair{query, x}, std::pair{x, key}}) {
      const auto [output, weights] = pair.ours(q, k, k);
      const auto [expected_output, expected_weights] = pair.reference(q, k, k);
      EXPECT_FALSE(torch::isfinite(output).all().item<bool>()) << bad;
      EXPECT_TRUE(torch::allclose(output, expected_output, 1e-4, 1e-5, /*equal_nan=*/true)) << bad;
      EXPECT_TRUE(torch::allclose(weights, expected_weights, 1e-4, 1e-5, /*equal_nan=*/true))
          << bad;
    }
  }
}

}  // namespace
