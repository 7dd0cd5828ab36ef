// The C++ modules on a CUDA device, against float64 references computed on the CPU. As in
// tests/python/test_cuda.py, low precision is judged against a yardstick in the same dtype: the
// error to float64 may be at most twice the yardstick's, plus a floor. Every test is skipped (and
// reported as skipped) without a CUDA device; with TORCHMHA_REQUIRE_CUDA=1 (scripts/gpu_check.sh)
// a missing device fails them instead, so a GPU run cannot skip them silently.
#include <torchmha/torchmha.h>

#ifdef TORCHMHA_TESTS_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "state_dict_files.h"
#include "test_helpers.h"

namespace {

using torchmha::testing::expect_close;
using torchmha::testing::expect_error_containing;

constexpr int64_t kEmbedDim = 64;
constexpr int64_t kHeads = 4;
constexpr int64_t kBatch = 3;
constexpr int64_t kLength = 17;
// Device parity in float64: the same arithmetic, summed in another order.
constexpr double kFloat64Tolerance = 1e-10;

const torch::Device kCuda(torch::kCUDA);
const std::vector<torch::Dtype> kDtypes{torch::kFloat32, torch::kBFloat16, torch::kFloat16};

// The floor of the low-precision rule (tests/python/test_cuda.py's ERROR_FLOOR), for when the
// yardstick's own error is tiny.
double error_floor(torch::Dtype dtype) {
  switch (dtype) {
    case torch::kBFloat16:
      return 1e-2;
    case torch::kHalf:
      return 1e-3;
    default:
      return 1e-5;
  }
}

// Largest absolute difference, compared on the CPU in float64.
double max_error(const torch::Tensor& found, const torch::Tensor& truth) {
  return (found.to(torch::kCPU, torch::kFloat64) - truth.to(torch::kCPU, torch::kFloat64))
      .abs()
      .max()
      .item<double>();
}

// `found` is at most twice as far from `truth` as `yardstick` (same dtype), plus the floor.
void expect_within_yardstick(const std::string& what, const torch::Tensor& found,
                             const torch::Tensor& yardstick, const torch::Tensor& truth,
                             torch::Dtype dtype) {
  ASSERT_EQ(found.sizes(), truth.sizes()) << what;
  const double ours = max_error(found, truth);
  const double theirs = max_error(yardstick, truth);
  EXPECT_LE(ours, 2 * theirs + error_floor(dtype))
      << what << " in " << dtype << ": " << ours << " from float64, the yardstick " << theirs;
}

class Cuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (torch::cuda::is_available()) {
      return;
    }
    const char* required = std::getenv("TORCHMHA_REQUIRE_CUDA");
    if (required != nullptr && std::string(required) == "1") {
      FAIL() << "TORCHMHA_REQUIRE_CUDA=1, but torch::cuda::is_available() is false (a LibTorch "
                "without CUDA, libtorch_cuda not linked, or no visible device)";
    }
    GTEST_SKIP() << "needs a CUDA device";
  }
};

class CudaByDtype : public Cuda, public ::testing::WithParamInterface<torch::Dtype> {};

std::string dtype_name(const ::testing::TestParamInfo<torch::Dtype>& info) {
  return std::string(c10::toString(info.param));
}

// Every parameter of `module` filled from a seeded normal distribution, biases too.
void randomize(torch::nn::Module& module, double scale) {
  torch::NoGradGuard no_grad;
  for (auto& parameter : module.parameters()) {
    parameter.copy_(torch::randn_like(parameter) * scale);
  }
}

// `target`'s parameters set to `source`'s values (same names), on `target`'s device and dtype.
void copy_parameters(const torch::nn::Module& source, torch::nn::Module& target) {
  torch::NoGradGuard no_grad;
  const auto values = source.named_parameters();
  for (auto& parameter : target.named_parameters()) {
    parameter.value().copy_(values[parameter.key()]);
  }
}

// ---- forward and backward against LibTorch's module ----------------------------------------

enum class MaskKind { kNone, kPadding, kCausal };

struct Masks {
  torch::Tensor key_padding_mask;  // bool (N, S), true = not allowed
  torch::Tensor attn_mask;         // float (L, S), -inf = not allowed
};

// LibTorch's module adds a bool `attn_mask` as 0/1, so the causal mask is a float one.
Masks make_masks(MaskKind kind) {
  Masks masks;
  if (kind == MaskKind::kPadding) {
    masks.key_padding_mask = torch::zeros({kBatch, kLength}, torch::kBool);
    masks.key_padding_mask[1].narrow(0, kLength / 2, kLength - kLength / 2).fill_(true);
  } else if (kind == MaskKind::kCausal) {
    masks.attn_mask =
        torch::full({kLength, kLength}, -std::numeric_limits<double>::infinity(), torch::kFloat64)
            .triu(1);
  }
  return masks;
}

Masks masks_on(const Masks& masks, torch::Device device, torch::Dtype dtype) {
  Masks moved;
  if (masks.key_padding_mask.defined()) {
    moved.key_padding_mask = masks.key_padding_mask.to(device);
  }
  if (masks.attn_mask.defined()) {
    moved.attn_mask = masks.attn_mask.to(device, dtype);
  }
  return moved;
}

std::tuple<torch::Tensor, torch::Tensor> forward_of(torchmha::MultiHeadAttention& module,
                                                    const torch::Tensor& x, const Masks& masks,
                                                    bool need_weights) {
  return module->forward(x, x, x, masks.key_padding_mask, need_weights, masks.attn_mask);
}

// LibTorch's module fills a padding mask in float and double only, and adds 2-D masks only: with
// padding, each batch entry runs alone, its padded keys masked by an additive (L, S) mask.
std::tuple<torch::Tensor, torch::Tensor> forward_of(torch::nn::MultiheadAttention& module,
                                                    const torch::Tensor& x, const Masks& masks,
                                                    bool need_weights) {
  if (!masks.key_padding_mask.defined()) {
    return module->forward(x, x, x, {}, need_weights, masks.attn_mask);
  }
  std::vector<torch::Tensor> outputs;
  std::vector<torch::Tensor> weights;
  for (int64_t entry = 0; entry < x.size(1); ++entry) {
    const auto one = x.narrow(1, entry, 1);
    const auto additive =
        torch::zeros({x.size(0), x.size(0)},
                     torch::TensorOptions().dtype(x.scalar_type()).device(x.device()))
            .masked_fill(masks.key_padding_mask[entry].unsqueeze(0),
                         -std::numeric_limits<double>::infinity());
    auto [output, weight] = module->forward(one, one, one, {}, true, additive);
    outputs.push_back(output);
    weights.push_back(weight);
  }
  return {torch::cat(outputs, 1), need_weights ? torch::cat(weights, 0) : torch::Tensor()};
}

// Output, input gradient and averaged weights (undefined without `need_weights`) of `module` on
// `x` (float64, converted to the module's device and dtype), the loss weighted by `cotangent`.
template <typename Module>
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> results(Module& module,
                                                                const torch::Tensor& x,
                                                                const torch::Tensor& cotangent,
                                                                const Masks& masks,
                                                                bool need_weights) {
  const auto weight = module->named_parameters()["in_proj_weight"];
  const auto on_device = masks_on(masks, weight.device(), weight.scalar_type());
  const auto leaf = x.to(weight.device(), weight.scalar_type()).detach().requires_grad_();
  auto [output, weights] = forward_of(module, leaf, on_device, need_weights);
  (output.to(torch::kFloat64) * cotangent.to(output.device())).sum().backward();
  return {output.detach(), leaf.grad(), need_weights ? weights.detach() : torch::Tensor()};
}

class CudaForward : public Cuda,
                    public ::testing::WithParamInterface<std::tuple<torch::Dtype, MaskKind>> {};

// The C++ module moved to the GPU in each dtype: output, input gradient and weights no further
// from LibTorch's module in float64 on the CPU than LibTorch's module in that dtype on the GPU.
TEST_P(CudaForward, OutputGradientAndWeightsAreAsCloseAsLibTorchs) {
  const auto [dtype, mask_kind] = GetParam();
  torch::manual_seed(0);
  torch::nn::MultiheadAttention reference(kEmbedDim, kHeads);
  reference->to(torch::kFloat64);
  randomize(*reference, 0.2);
  torch::nn::MultiheadAttention libtorch_in_dtype(kEmbedDim, kHeads);
  copy_parameters(*reference, *libtorch_in_dtype);
  libtorch_in_dtype->to(kCuda, dtype);
  torchmha::MultiHeadAttention ours(kEmbedDim, kHeads);
  copy_parameters(*reference, *ours);
  ours->to(kCuda, dtype);
  for (const auto& parameter : ours->parameters()) {
    ASSERT_TRUE(parameter.is_cuda());
    ASSERT_EQ(parameter.scalar_type(), dtype);
  }

  const auto x = torch::randn({kLength, kBatch, kEmbedDim}, torch::kFloat64);
  const auto cotangent = torch::randn_like(x);
  const auto masks = make_masks(mask_kind);
  for (const bool need_weights : {false, true}) {
    SCOPED_TRACE(need_weights ? "need_weights" : "no weights");
    const auto [output, grad, weights] = results(ours, x, cotangent, masks, need_weights);
    ASSERT_TRUE(output.is_cuda());
    ASSERT_EQ(output.scalar_type(), dtype);
    const auto [yardstick_output, yardstick_grad, yardstick_weights] =
        results(libtorch_in_dtype, x, cotangent, masks, true);
    const auto [exact_output, exact_grad, exact_weights] =
        results(reference, x, cotangent, masks, true);
    expect_within_yardstick("output", output, yardstick_output, exact_output, dtype);
    expect_within_yardstick("input gradient", grad, yardstick_grad, exact_grad, dtype);
    if (need_weights) {
      expect_within_yardstick("weights", weights, yardstick_weights, exact_weights, dtype);
    } else {
      EXPECT_FALSE(weights.defined());
    }
  }
}

std::string forward_case_name(
    const ::testing::TestParamInfo<std::tuple<torch::Dtype, MaskKind>>& info) {
  const auto [dtype, mask_kind] = info.param;
  switch (mask_kind) {
    case MaskKind::kPadding:
      return std::string(c10::toString(dtype)) + "Padding";
    case MaskKind::kCausal:
      return std::string(c10::toString(dtype)) + "Causal";
    default:
      return std::string(c10::toString(dtype)) + "NoMask";
  }
}

INSTANTIATE_TEST_SUITE_P(DtypesAndMasks, CudaForward,
                         ::testing::Combine(::testing::ValuesIn(kDtypes),
                                            ::testing::Values(MaskKind::kNone, MaskKind::kPadding,
                                                              MaskKind::kCausal)),
                         forward_case_name);

// ---- the module's device moves --------------------------------------------------------------

TEST_F(Cuda, ModuleMovesToTheDeviceAndBackUnchanged) {
  torch::manual_seed(0);
  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(kEmbedDim, kHeads).num_kv_heads(2).add_bias_kv(true));
  randomize(*attention, 0.2);
  const auto before = torchmha::testing::snapshot(*attention);
  attention->to(kCuda);
  for (const auto& parameter : attention->named_parameters()) {
    EXPECT_TRUE(parameter.value().is_cuda()) << parameter.key();
  }
  const auto x = torch::randn({kLength, kBatch, kEmbedDim}, kCuda);
  const auto [output, weights] = attention->forward(x, x, x);
  EXPECT_TRUE(output.is_cuda());
  EXPECT_TRUE(weights.is_cuda());
  attention->to(torch::kCPU);
  EXPECT_TRUE(torchmha::testing::has_values(*attention, before));
}

// A module on the CPU refuses inputs on the GPU by name, with both devices.
TEST_F(Cuda, InputsOnTheGpuForAModuleOnTheCpuAreRefusedByName) {
  torchmha::MultiHeadAttention attention(kEmbedDim, kHeads);
  const auto x = torch::randn({kLength, kBatch, kEmbedDim}, kCuda);
  expect_error_containing(
      [&] { attention->forward(x, x, x); },
      {"torchmha.multi_head_attention: ", "`in_proj_weight`", "device of `query` (cuda:0)", "cpu"});
  attention->to(kCuda);
  const auto padding = torch::zeros({kBatch, kLength}, torch::kBool);
  expect_error_containing([&] { attention->forward(x, x, x, padding); },
                          {"`key_padding_mask`", "cuda:0", "cpu"});
}

// State-dict files written from a module on the GPU load into a module on the GPU, and into one
// on the CPU.
TEST_F(Cuda, StateDictFilesRoundTripFromAndToTheDevice) {
  torch::manual_seed(0);
  torchmha::MultiHeadAttention saved(kEmbedDim, kHeads);
  randomize(*saved, 0.2);
  saved->to(kCuda);
  torchmha::testing::TempFile file("cuda_state_dict.pt");
  torchmha::save_state_dict(*saved, file.path());
  torchmha::MultiHeadAttention loaded(kEmbedDim, kHeads);
  loaded->to(kCuda);
  torchmha::load_state_dict(*loaded, file.path());
  const auto saved_values = saved->named_parameters();
  for (const auto& parameter : loaded->named_parameters()) {
    EXPECT_TRUE(parameter.value().is_cuda()) << parameter.key();
    EXPECT_TRUE(parameter.value().equal(saved_values[parameter.key()])) << parameter.key();
  }
  torchmha::MultiHeadAttention on_cpu(kEmbedDim, kHeads);
  torchmha::load_state_dict(*on_cpu, file.path());
  for (const auto& parameter : on_cpu->named_parameters()) {
    EXPECT_TRUE(parameter.value().is_cpu()) << parameter.key();
    EXPECT_TRUE(parameter.value().equal(saved_values[parameter.key()].cpu())) << parameter.key();
  }
}

// ---- grouped-query attention with rotary embeddings ----------------------------------------

torchmha::MultiHeadAttention grouped_rotary_module() {
  torchmha::MultiHeadAttention attention(torchmha::MultiHeadAttentionOptions(kEmbedDim, kHeads)
                                             .batch_first(true)
                                             .num_kv_heads(2)
                                             .rope_theta(10000.0));
  attention->to(torch::kFloat64);
  randomize(*attention, 0.2);
  return attention;
}

torchmha::MultiHeadAttention moved_copy(const torchmha::MultiHeadAttention& attention,
                                        torch::Device device, torch::Dtype dtype) {
  auto copy = std::dynamic_pointer_cast<torchmha::MultiHeadAttentionImpl>(attention->clone());
  copy->to(device, dtype);
  return torchmha::MultiHeadAttention(copy);
}

// Causal self-attention with grouped heads, rotary embeddings at given positions, a padding
// mask, with and without averaged weights: in float64 the GPU computes what the CPU computes;
// in each dtype it is no further from that than the CPU in the same dtype.
TEST_P(CudaByDtype, GroupedRotaryModuleMatchesTheCpu) {
  const auto dtype = GetParam();
  torch::manual_seed(0);
  const auto attention = grouped_rotary_module();
  const auto x = torch::randn({kBatch, kLength, kEmbedDim}, torch::kFloat64);
  const auto positions = torch::randint(0, 50, {kBatch, kLength}, torch::kInt64);
  auto padding = torch::zeros({kBatch, kLength}, torch::kBool);
  padding[2].narrow(0, kLength - 3, 3).fill_(true);
  torch::NoGradGuard no_grad;
  // Holders by value: forward is not const.
  const auto run = [&](torchmha::MultiHeadAttention module, bool need_weights) {
    const auto& weight = module->in_proj_weight;
    const auto input = x.to(weight.device(), weight.scalar_type());
    return module->forward(input, input, input, padding.to(weight.device()), need_weights, {},
                           /*average_attn_weights=*/true, /*is_causal=*/true,
                           positions.to(weight.device()));
  };
  const auto on_gpu64 = moved_copy(attention, kCuda, torch::kFloat64);
  const auto on_gpu = moved_copy(attention, kCuda, dtype);
  const auto on_cpu = moved_copy(attention, torch::kCPU, dtype);
  for (const bool need_weights : {false, true}) {
    SCOPED_TRACE(need_weights ? "need_weights" : "no weights");
    const auto [truth, truth_weights] = run(attention, need_weights);
    const auto [exact, exact_weights] = run(on_gpu64, need_weights);
    EXPECT_TRUE(exact.is_cuda());
    expect_close(exact.cpu(), truth, kFloat64Tolerance);
    const auto [output, weights] = run(on_gpu, need_weights);
    const auto [cpu_output, cpu_weights] = run(on_cpu, need_weights);
    expect_within_yardstick("output", output, cpu_output, truth, dtype);
    if (need_weights) {
      expect_close(exact_weights.cpu(), truth_weights, kFloat64Tolerance);
      expect_within_yardstick("weights", weights, cpu_weights, truth_weights, dtype);
    }
  }
}

// ---- the key/value cache -------------------------------------------------------------------

// A prefill (SDPA), single tokens and a chunk (the grouped GEMMs over the cache).
const std::vector<int64_t> kCacheSteps{20, 1, 1, 3, 1};

// The outputs of `sequence` (N, T, E) decoded through a new cache on the module's device.
torch::Tensor decode(torchmha::MultiHeadAttention attention, const torch::Tensor& sequence) {
  auto cache = attention->new_kv_cache(sequence.size(0), sequence.size(1) + 2);
  EXPECT_EQ(cache->key.device(), attention->in_proj_weight.device());
  EXPECT_EQ(cache->seq_lens.device(), attention->in_proj_weight.device());
  EXPECT_EQ(cache->key.scalar_type(), attention->in_proj_weight.scalar_type());
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> outputs;
  int64_t start = 0;
  for (const int64_t length : kCacheSteps) {
    const auto chunk = sequence.narrow(1, start, length);
    outputs.push_back(std::get<0>(attention->forward(chunk, chunk, chunk, {}, false, {}, true,
                                                     /*is_causal=*/true, {}, cache)));
    start += length;
  }
  EXPECT_TRUE(cache->seq_lens.cpu().equal(torch::full({sequence.size(0)}, start, torch::kLong)));
  return torch::cat(outputs, 1);
}

torch::Tensor full_causal_forward(torchmha::MultiHeadAttention attention,
                                  const torch::Tensor& sequence) {
  torch::NoGradGuard no_grad;
  return std::get<0>(
      attention->forward(sequence, sequence, sequence, {}, false, {}, true, /*is_causal=*/true));
}

// Decoding on the GPU: in float64 it equals the full causal forward on the CPU; in each dtype its
// error is at most twice that of the full causal forward on the GPU in that dtype.
TEST_P(CudaByDtype, KVCacheDecodingEqualsTheFullCausalForward) {
  const auto dtype = GetParam();
  torch::manual_seed(0);
  const auto attention = grouped_rotary_module();
  int64_t total = 0;
  for (const int64_t length : kCacheSteps) {
    total += length;
  }
  const auto sequence = torch::randn({kBatch, total, kEmbedDim}, torch::kFloat64);
  const auto truth = full_causal_forward(attention, sequence);
  const auto exact = decode(moved_copy(attention, kCuda, torch::kFloat64), sequence.to(kCuda));
  EXPECT_TRUE(exact.is_cuda());
  expect_close(exact.cpu(), truth, kFloat64Tolerance);
  const auto low = moved_copy(attention, kCuda, dtype);
  const auto low_sequence = sequence.to(kCuda, dtype);
  expect_within_yardstick("decoded output", decode(low, low_sequence),
                          full_causal_forward(low, low_sequence), truth, dtype);
}

// A cache made on the CPU follows its module to the GPU (`to`), keeping what it holds.
TEST_F(Cuda, KVCacheMovesToTheDeviceWithItsContents) {
  torch::manual_seed(0);
  auto attention = grouped_rotary_module();
  auto cache = attention->new_kv_cache(kBatch, 8);
  const auto prompt = torch::randn({kBatch, 3, kEmbedDim}, torch::kFloat64);
  torch::NoGradGuard no_grad;
  attention->forward(prompt, prompt, prompt, {}, false, {}, true, true, {}, cache);
  const auto key = cache->key.clone();
  attention->to(kCuda);
  cache->to(kCuda, torch::kFloat64);
  EXPECT_TRUE(cache->key.is_cuda());
  EXPECT_TRUE(cache->seq_lens.is_cuda());
  EXPECT_EQ(cache->seq_lens.scalar_type(), torch::kLong);
  EXPECT_TRUE(cache->key.cpu().equal(key));
  const auto token =
      torch::randn({kBatch, 1, kEmbedDim}, torch::TensorOptions(kCuda).dtype(torch::kFloat64));
  const auto [output, weights] =
      attention->forward(token, token, token, {}, true, {}, true, true, {}, cache);
  EXPECT_TRUE(output.is_cuda());
  EXPECT_TRUE(cache->seq_lens.cpu().equal(torch::full({kBatch}, 4, torch::kLong)));
  // The new token's weights over the cache sum to one over the 4 filled positions.
  expect_close(weights.narrow(-1, 0, 4).sum(-1).cpu(), torch::ones({kBatch, 1}, torch::kFloat64),
               kFloat64Tolerance);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaByDtype, ::testing::ValuesIn(kDtypes), dtype_name);

#ifdef TORCHMHA_TESTS_CUDA_GRAPHS
constexpr int64_t kGraphEmbedDim = 32;
constexpr int64_t kPrompt = 5;

torchmha::MultiHeadAttention grouped_rotary_module_on_cuda() {
  torchmha::MultiHeadAttention attention(torchmha::MultiHeadAttentionOptions(kGraphEmbedDim, 4)
                                             .bias(false)
                                             .batch_first(true)
                                             .num_kv_heads(2)
                                             .rope_theta(10000.0));
  attention->to(torch::Device(torch::kCUDA), torch::kFloat64);
  return attention;
}

// The module's step over `token` at cache length kPrompt (the lengths rewound first).
torch::Tensor step_at_prompt(torchmha::MultiHeadAttention& attention,
                             const torchmha::KVCache& cache, const torch::Tensor& token) {
  cache->seq_lens.fill_(kPrompt);
  return std::get<0>(attention->forward(token, token, token, {}, /*need_weights=*/false, {},
                                        /*average_attn_weights=*/true, /*is_causal=*/true, {},
                                        cache));
}
#endif

// A decoding step captured into an at::cuda::CUDAGraph and replayed: the op checks the cache's
// lengths inside the graph while the stream captures (a copy to the host is refused then), and
// each replay computes what the eager step computes.
TEST_F(Cuda, CapturedDecodingStepReplaysTheEagerStep) {
#ifndef TORCHMHA_TESTS_CUDA_GRAPHS
  GTEST_SKIP() << "LibTorch without CUDA";
#else
  torch::manual_seed(0);
  auto attention = grouped_rotary_module_on_cuda();
  const auto options = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat64);
  const auto prompt = torch::randn({2, kPrompt, kGraphEmbedDim}, options);
  const auto token = torch::randn({2, 1, kGraphEmbedDim}, options);
  const c10::InferenceMode inference;
  const auto eager_cache = attention->new_kv_cache(2, 16);
  const auto graph_cache = attention->new_kv_cache(2, 16);
  for (const auto* cache : {&eager_cache, &graph_cache}) {
    attention->forward(prompt, prompt, prompt, {}, false, {}, true, /*is_causal=*/true, {}, *cache);
  }
  const auto expected = step_at_prompt(attention, eager_cache, token);

  at::cuda::CUDAGraph graph;
  torch::Tensor replayed;
  {
    torch::cuda::synchronize();
    const c10::cuda::CUDAStreamGuard side_stream(c10::cuda::getStreamFromPool());
    step_at_prompt(attention, graph_cache, token);  // warm-up outside capture
    torch::cuda::synchronize();
    graph.capture_begin();
    replayed = step_at_prompt(attention, graph_cache, token);
    graph.capture_end();
  }
  graph_cache->key.zero_();  // the replays must write the step's keys and values themselves
  graph_cache->value.zero_();
  attention->forward(prompt, prompt, prompt, {}, false, {}, true, true, {}, graph_cache);
  for (int replay = 0; replay < 2; ++replay) {
    graph.replay();
    torch::cuda::synchronize();
    EXPECT_TRUE(torch::allclose(replayed, expected, 1e-12, 1e-12)) << "replay " << replay;
    EXPECT_TRUE(torch::allclose(graph_cache->key, eager_cache->key, 1e-12, 1e-12));
    EXPECT_TRUE(torch::allclose(graph_cache->value, eager_cache->value, 1e-12, 1e-12));
    EXPECT_TRUE(torch::equal(graph_cache->seq_lens, eager_cache->seq_lens));
  }
#endif
}

}  // namespace
