// Files made by Python, read by C++: TorchScript models using torchmha and a PyTorch state dict.
// ctest runs tests/fixtures/make_interchange_fixtures.py first and points TORCHMHA_FIXTURES at
// its folder.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torchmha/torchmha.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>

#include "../fixture_files.h"

namespace {

constexpr double kFloat32Tolerance = 1e-5;

std::filesystem::path fixtures() { return torchmha::testing::fixture_folder("TORCHMHA_FIXTURES"); }

// `expected.pt`, a plain dict of tensors saved by torch.save in Python.
const c10::Dict<c10::IValue, c10::IValue>& expected() {
  static const auto dict = torchmha::testing::load_pickled_dict(fixtures() / "expected.pt");
  return dict;
}

torch::Tensor expected_tensor(const std::string& name) { return expected().at(name).toTensor(); }

void expect_close(const torch::Tensor& actual, const torch::Tensor& wanted) {
  ASSERT_EQ(actual.sizes(), wanted.sizes());
  EXPECT_LE((actual - wanted).abs().max().item<double>(), kFloat32Tolerance);
}

class TorchScriptModel : public ::testing::TestWithParam<std::string> {};

TEST_P(TorchScriptModel, RunsInCppWithPythonsOutput) {
  // TorchScript is PyTorch's deprecated path: where the Python that made the fixtures refuses it,
  // say so rather than fail.
  std::ifstream refused(fixtures() / "torchscript_refused.txt");
  if (refused) {
    GTEST_SKIP() << std::string((std::istreambuf_iterator<char>(refused)),
                                std::istreambuf_iterator<char>());
  }
  auto model = torch::jit::load((fixtures() / (GetParam() + ".pt")).string());
  model.eval();
  // Each model's second input and its expected output, by the file's prefix.
  const auto model_name = GetParam().substr(0, GetParam().find('_'));
  const std::map<std::string, std::string> second_inputs{
      {"block", "key_padding_mask"}, {"textbook", "mask"}, {"decoder", "positions"}};
  torch::NoGradGuard no_grad;
  const auto output =
      model.forward({expected_tensor("x"), expected_tensor(second_inputs.at(model_name))})
          .toTensor();
  expect_close(output, expected_tensor(model_name));
}

INSTANTIATE_TEST_SUITE_P(ScriptedAndTraced, TorchScriptModel,
                         ::testing::Values("block_scripted", "block_traced", "textbook_scripted",
                                           "textbook_traced", "decoder_scripted",
                                           "decoder_traced"));

TEST(StateDict, PyTorchModuleWeightsLoadIntoTheCppModule) {
  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(16, 4).batch_first(true));
  torchmha::load_state_dict(*attention, (fixtures() / "torch_mha_state_dict.pt").string());
  attention->eval();
  const auto x = expected_tensor("x");
  const auto output =
      std::get<0>(attention(x, x, x, expected_tensor("key_padding_mask"), /*need_weights=*/false));
  expect_close(output, expected_tensor("torch_mha"));
}

TEST(StateDict, RoundTripThroughAFileIsExact) {
  torchmha::MultiHeadAttention original(
      torchmha::MultiHeadAttentionOptions(16, 4).kdim(6).vdim(5).add_bias_kv(true));
  const auto path = (std::filesystem::temp_directory_path() / "torchmha_round_trip.pt").string();
  torchmha::save_state_dict(*original, path);
  torchmha::MultiHeadAttention copy(
      torchmha::MultiHeadAttentionOptions(16, 4).kdim(6).vdim(5).add_bias_kv(true));
  torchmha::load_state_dict(*copy, path);
  std::filesystem::remove(path);
  auto copied = copy->named_parameters();
  for (const auto& parameter : original->named_parameters()) {
    EXPECT_TRUE(torch::equal(parameter.value(), copied[parameter.key()])) << parameter.key();
  }
}

}  // namespace
