// AOTInductor packages made by Python (torch.export + aoti_compile_and_package), run from C++
// with torch::inductor::AOTIModelPackageLoader. ctest runs tests/fixtures/make_aoti_packages.py
// first and points TORCHMHA_AOTI_FIXTURES at its folder.
#include <gtest/gtest.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torchmha/torchmha.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "../fixture_files.h"

namespace {

constexpr double kFloat32Tolerance = 1e-5;
constexpr double kFloat32RelativeTolerance = 1e-4;
// The lengths the fixture script ran Python at (its RUN_LENGTHS); 7 is the exported one.
const auto kRunLengths = ::testing::Values(3, 7, 12);
// The exported range of the sequence length (its LENGTH_RANGE).
constexpr int64_t kShortestLength = 2;
constexpr int64_t kLongestLength = 16;

std::filesystem::path fixtures() {
  return torchmha::testing::fixture_folder("TORCHMHA_AOTI_FIXTURES");
}

// `expected.pt`, a plain dict of tensors saved by torch.save in Python.
const c10::Dict<c10::IValue, c10::IValue>& expected() {
  static const auto dict = torchmha::testing::load_pickled_dict(fixtures() / "expected.pt");
  return dict;
}

torch::Tensor expected_tensor(const std::string& name, int64_t length) {
  return expected().at(name + "/" + std::to_string(length)).toTensor();
}

torch::inductor::AOTIModelPackageLoader load_package(const std::string& name) {
  return torch::inductor::AOTIModelPackageLoader((fixtures() / name).string());
}

// The package's only output.
torch::Tensor run_package(torch::inductor::AOTIModelPackageLoader& package,
                          const std::vector<torch::Tensor>& inputs) {
  auto outputs = package.run(inputs);
  EXPECT_EQ(outputs.size(), 1U);
  return outputs.at(0);
}

void expect_close(const torch::Tensor& actual, const torch::Tensor& wanted) {
  ASSERT_EQ(actual.sizes(), wanted.sizes());
  EXPECT_LE((actual - wanted).abs().max().item<double>(), kFloat32Tolerance);
}

class SelfAttentionPackage : public ::testing::TestWithParam<int64_t> {};

TEST_P(SelfAttentionPackage, GivesPythonsOutputAtEveryLengthOfTheExportedRange) {
  const int64_t length = GetParam();
  auto package = load_package("self_attention.pt2");
  const auto output = run_package(
      package, {expected_tensor("x", length), expected_tensor("key_padding_mask", length)});
  expect_close(output, expected_tensor("self_attention", length));
}

// The weights went C++ -> file -> Python -> package: the package, the C++ module reading the same
// file, and Python agree.
TEST_P(SelfAttentionPackage, GivesTheOutputOfTheCppModuleThatSavedItsWeights) {
  const int64_t length = GetParam();
  // The package's module: grouped-query attention with rotary embeddings (NUM_KV_HEADS,
  // ROPE_THETA).
  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(16, 4).batch_first(true).num_kv_heads(2).rope_theta(
          10000.0));
  torchmha::load_state_dict(*attention, (fixtures() / "cpp_saved_weights.pt").string());
  attention->eval();
  const auto x = expected_tensor("x", length);
  const auto key_padding_mask = expected_tensor("key_padding_mask", length);
  torch::NoGradGuard no_grad;
  const auto module_output =
      std::get<0>(attention->forward(x, x, x, key_padding_mask, /*need_weights=*/false,
                                     /*attn_mask=*/{}, /*average_attn_weights=*/true,
                                     /*is_causal=*/true));
  auto package = load_package("self_attention.pt2");
  expect_close(run_package(package, {x, key_padding_mask}), module_output);
  expect_close(module_output, expected_tensor("self_attention", length));
}

INSTANTIATE_TEST_SUITE_P(Lengths, SelfAttentionPackage, kRunLengths);

class TextbookPackage : public ::testing::TestWithParam<int64_t> {};

TEST_P(TextbookPackage, GivesPythonsOutputAtEveryLengthOfTheExportedRange) {
  const int64_t length = GetParam();
  auto package = load_package("textbook.pt2");
  const auto output =
      run_package(package, {expected_tensor("x", length), expected_tensor("mask", length)});
  expect_close(output, expected_tensor("textbook", length));
}

INSTANTIATE_TEST_SUITE_P(Lengths, TextbookPackage, kRunLengths);

// Inputs that do not match the exported ones. The package's generated code checks sizes, strides,
// dtypes and the length's range only when AOTI_RUNTIME_CHECK_INPUTS is set when it first runs;
// without it such inputs are read out of bounds. The loader checks the number of inputs itself.
class MismatchedInputs : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", 1), 0); }

  // The run throws (the generated checks throw std::runtime_error through the loader) with a
  // message that holds `reason`.
  static void expect_rejected(const std::vector<torch::Tensor>& inputs, const std::string& reason) {
    auto package = load_package("self_attention.pt2");
    try {
      package.run(inputs);
      ADD_FAILURE() << "the package ran on mismatched inputs; expected: " << reason;
    } catch (const std::exception& error) {
      EXPECT_NE(std::string(error.what()).find(reason), std::string::npos) << error.what();
    }
  }

  static torch::Tensor padding(int64_t length) { return torch::zeros({2, length}, torch::kBool); }
};

TEST_F(MismatchedInputs, MissingBatchDimensionIsAnError) {
  expect_rejected({torch::randn({7, 16}), padding(7)}, "unmatched dim value at 0");
}

TEST_F(MismatchedInputs, ExtraDimensionIsAnError) {
  expect_rejected({torch::randn({2, 7, 16, 1}), padding(7)}, "expected ndim 3 but got 4");
}

TEST_F(MismatchedInputs, PaddingMaskOfAnotherLengthIsAnError) {
  expect_rejected({torch::randn({2, 7, 16}), padding(6)}, "expected size 6==7");
}

TEST_F(MismatchedInputs, WrongEmbeddingSizeIsAnError) {
  expect_rejected({torch::randn({2, 7, 8}), padding(7)}, "unmatched dim value at 2");
}

TEST_F(MismatchedInputs, WrongDtypeIsAnError) {
  expect_rejected({torch::randn({2, 7, 16}, torch::kFloat64), padding(7)}, "unmatched dtype");
}

TEST_F(MismatchedInputs, LengthAboveTheExportedRangeIsAnError) {
  const int64_t length = kLongestLength + 1;
  expect_rejected({torch::randn({2, length, 16}), padding(length)}, "dim value is too large");
}

TEST_F(MismatchedInputs, LengthBelowTheExportedRangeIsAnError) {
  const int64_t length = kShortestLength - 1;
  expect_rejected({torch::randn({2, length, 16}), padding(length)}, "dim value is too small");
}

TEST_F(MismatchedInputs, MissingInputIsAnError) {
  expect_rejected({torch::randn({2, 7, 16})}, "expected inputs vector size to be 2");
}

// `greedy_decoder.pt2`: a tiny decoder (embedding, causal self-attention with grouped key/value
// heads, rotary embeddings and a key/value cache it owns as buffers, linear head, argmax), one
// program for the prefill and the single-token steps. The package keeps the cache in the loader
// and writes it in place at every run.
class GreedyDecoderPackage : public ::testing::Test {
 protected:
  // `generation` is "decoder" (the CPU package's) or "decoder_cuda" (the CUDA package's).
  static torch::Tensor decoder_tensor(const std::string& name,
                                      const std::string& generation = "decoder") {
    return expected().at(generation + "/" + name).toTensor();
  }

  // The greedy loop of the fixture script (interchange_models.greedy_generation) from its
  // right-padded prompts: each step's chosen tokens must be Python's, and their logits too.
  static void expect_pythons_generation(torch::inductor::AOTIModelPackageLoader& package,
                                        const std::string& generation = "decoder",
                                        torch::Device device = torch::kCPU) {
    const auto wanted_tokens = decoder_tensor("tokens", generation);
    const auto wanted_logits = decoder_tensor("logits", generation);
    auto tokens = decoder_tensor("prompt_tokens", generation).to(device);
    auto padding = decoder_tensor("prompt_padding", generation).to(device);
    for (int64_t step = 0; step < wanted_tokens.size(1); ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      const auto outputs = package.run({tokens, padding});
      ASSERT_EQ(outputs.size(), 2U);
      ASSERT_EQ(outputs[0].device().type(), device.type());
      EXPECT_TRUE(torch::equal(outputs[0].cpu(), wanted_tokens.select(1, step)))
          << outputs[0] << " instead of " << wanted_tokens.select(1, step);
      if (device.is_cpu()) {
        expect_close(outputs[1], wanted_logits.select(1, step));
      } else {
        // Python's float32 tolerance (tests/python/conftest.py): the package's generated kernels
        // sum in another order than eager's.
        EXPECT_TRUE(torch::allclose(outputs[1].cpu(), wanted_logits.select(1, step),
                                    kFloat32RelativeTolerance, kFloat32Tolerance))
            << "largest difference "
            << (outputs[1].cpu() - wanted_logits.select(1, step)).abs().max().item<double>();
      }
      // The chosen tokens, one per entry, are the next step's input.
      tokens = outputs[0].unsqueeze(1);
      padding = torch::zeros_like(tokens, torch::kBool);
    }
  }
};

// From the second step on, a step is right only if the earlier steps' keys and values persisted
// in the package's cache.
TEST_F(GreedyDecoderPackage, GeneratesPythonsTokensAndLogitsStepByStep) {
  auto package = load_package("greedy_decoder.pt2");
  expect_pythons_generation(package);
}

// The cache lives in each loader: one that has generated leaves another, loaded from the same
// file, with an empty cache.
TEST_F(GreedyDecoderPackage, EachLoaderHasItsOwnCache) {
  auto first = load_package("greedy_decoder.pt2");
  expect_pythons_generation(first);
  auto second = load_package("greedy_decoder.pt2");
  expect_pythons_generation(second);
}

// The package cannot read the lengths' values ahead as eager calls do, but its graph asserts them:
// a step past the cache's max_seq_len is an error with the op's message, never a write out of
// bounds.
TEST_F(GreedyDecoderPackage, StepPastMaxSeqLenIsAnError) {
  auto package = load_package("greedy_decoder.pt2");
  expect_pythons_generation(package);
  // The first entry is the longest: after the generation it has this many positions left.
  const int64_t max_seq_len = 16;  // interchange_models.MAX_SEQ_LEN
  const int64_t left = max_seq_len - decoder_tensor("prompt_tokens").size(1) -
                       (decoder_tensor("tokens").size(1) - 1);
  const auto token = torch::zeros({2, 1}, torch::kLong);
  const auto padding = torch::zeros({2, 1}, torch::kBool);
  for (int64_t step = 0; step < left; ++step) {
    package.run({token, padding});
  }
  try {
    package.run({token, padding});
    ADD_FAILURE() << "a step past max_seq_len ran";
  } catch (const std::exception& error) {
    EXPECT_NE(std::string(error.what()).find("the step would pass max_seq_len"), std::string::npos)
        << error.what();
  }
}

// `greedy_decoder_cuda.pt2`: the decoder exported on the GPU, a CUDA package. Skipped without
// CUDA; with TORCHMHA_REQUIRE_CUDA=1 (scripts/gpu_check.sh) a missing device fails it instead.
class CudaGreedyDecoderPackage : public GreedyDecoderPackage {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) {
      const char* required = std::getenv("TORCHMHA_REQUIRE_CUDA");
      ASSERT_FALSE(required != nullptr && std::string(required) == "1")
          << "TORCHMHA_REQUIRE_CUDA=1, but torch::cuda::is_available() is false";
      GTEST_SKIP() << "needs a CUDA device";
    }
    const auto error = fixtures() / "cuda_error.txt";
    if (std::filesystem::exists(error)) {
      std::ifstream stream(error);
      FAIL() << "the fixture script could not make the CUDA package:\n"
             << std::string(std::istreambuf_iterator<char>(stream),
                            std::istreambuf_iterator<char>());
    }
    ASSERT_TRUE(std::filesystem::exists(fixtures() / "greedy_decoder_cuda.pt2"))
        << "no CUDA package: the fixture script's Python saw no CUDA device";
  }
};

// The CUDA package keeps its cache on the GPU and generates, from the second step on, what
// Python's eager decoder generated on the GPU.
TEST_F(CudaGreedyDecoderPackage, GeneratesPythonsTokensAndLogitsStepByStep) {
  auto package = load_package("greedy_decoder_cuda.pt2");
  expect_pythons_generation(package, "decoder_cuda", torch::Device(torch::kCUDA));
}

TEST_F(CudaGreedyDecoderPackage, EachLoaderHasItsOwnCache) {
  auto first = load_package("greedy_decoder_cuda.pt2");
  expect_pythons_generation(first, "decoder_cuda", torch::Device(torch::kCUDA));
  auto second = load_package("greedy_decoder_cuda.pt2");
  expect_pythons_generation(second, "decoder_cuda", torch::Device(torch::kCUDA));
}

TEST(MissingPackage, IsAnError) { EXPECT_THROW(load_package("no_such_package.pt2"), c10::Error); }

}  // namespace
