// The C++ module against what torch.nn.MultiheadAttention computed in Python (float64): output,
// weights and the gradients of inputs and parameters, over
// tests/fixtures/make_parity_fixtures.py's cases, which cover every constructor and forward
// argument.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torchmha/torchmha.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace {

constexpr double kFloat64Tolerance = 1e-10;

using Dict = c10::Dict<c10::IValue, c10::IValue>;

std::filesystem::path parity_folder() {
  const char* folder = std::getenv("TORCHMHA_FIXTURES");
  if (folder == nullptr) {
    throw std::runtime_error("TORCHMHA_FIXTURES is not set; run these tests through ctest");
  }
  return std::filesystem::path(folder) / "parity";
}

Dict read_case(const std::string& name) {
  std::ifstream stream(parity_folder() / (name + ".pt"), std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(stream)),
                                std::istreambuf_iterator<char>());
  return torch::jit::pickle_load(bytes).toGenericDict();
}

int64_t option(const Dict& config, const std::string& name, int64_t otherwise) {
  return config.contains(name) ? config.at(name).toInt() : otherwise;
}

torch::Tensor optional_tensor(const Dict& dict, const std::string& name) {
  return dict.contains(name) ? dict.at(name).toTensor() : torch::Tensor();
}

void expect_close(const torch::Tensor& actual, const torch::Tensor& expected,
                  const std::string& what) {
  ASSERT_TRUE(actual.defined()) << what;
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  EXPECT_LE((actual - expected).abs().max().item<double>(), kFloat64Tolerance) << what;
}

void check_case(const std::string& name) {
  SCOPED_TRACE(name);
  const auto fixture = read_case(name);
  const auto config = fixture.at("config").toGenericDict();
  const auto flags = fixture.at("flags").toGenericDict();
  const auto embed_dim = option(config, "embed_dim", 0);
  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(embed_dim, option(config, "num_heads", 0))
          .bias(option(config, "bias", 1) != 0)
          .add_bias_kv(option(config, "add_bias_kv", 0) != 0)
          .add_zero_attn(option(config, "add_zero_attn", 0) != 0)
          .kdim(option(config, "kdim", embed_dim))
          .vdim(option(config, "vdim", embed_dim))
          .batch_first(option(config, "batch_first", 0) != 0));
  attention->to(torch::kFloat64);
  const auto state_dict = fixture.at("state_dict").toGenericDict();
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : attention->named_parameters()) {
      parameter.value().copy_(state_dict.at(parameter.key()).toTensor());
    }
  }

  const auto inputs = fixture.at("inputs").toGenericDict();
  const auto query = inputs.at("query").toTensor().clone().requires_grad_();
  // Self-attention passes one tensor three times, as Python did.
  const auto key =
      inputs.contains("key") ? inputs.at("key").toTensor().clone().requires_grad_() : query;
  const auto value =
      inputs.contains("value") ? inputs.at("value").toTensor().clone().requires_grad_() : query;
  const auto masks = fixture.at("masks").toGenericDict();
  const bool need_weights = flags.at("need_weights").toInt() != 0;
  const auto [output, weights] = attention->forward(
      query, key, value, optional_tensor(masks, "key_padding_mask"), need_weights,
      optional_tensor(masks, "attn_mask"), flags.at("average_attn_weights").toInt() != 0,
      flags.at("is_causal").toInt() != 0);

  expect_close(output, fixture.at("output").toTensor(), "output");
  if (need_weights) {
    expect_close(weights, fixture.at("weights").toTensor(), "weights");
  }
  (output * fixture.at("cotangent").toTensor()).sum().backward();
  const auto input_grads = fixture.at("input_grads").toGenericDict();
  expect_close(query.grad(), input_grads.at("query").toTensor(), "query grad");
  if (inputs.contains("key")) {
    expect_close(key.grad(), input_grads.at("key").toTensor(), "key grad");
    expect_close(value.grad(), input_grads.at("value").toTensor(), "value grad");
  }
  const auto parameter_grads = fixture.at("parameter_grads").toGenericDict();
  for (const auto& parameter : attention->named_parameters()) {
    expect_close(parameter.value().grad(), parameter_grads.at(parameter.key()).toTensor(),
                 parameter.key() + " grad");
  }
}

TEST(ParityFixtures, EveryCaseMatchesPyTorch) {
  std::ifstream list(parity_folder() / "cases.txt");
  std::string name;
  int cases = 0;
  while (std::getline(list, name)) {
    if (!name.empty()) {
      check_case(name);
      ++cases;
    }
  }
  EXPECT_GE(cases, 9) << "fewer cases than tests/fixtures/make_parity_fixtures.py writes";
}

}  // namespace
