// The C++ module against what torch.nn.MultiheadAttention computed in Python (float64): output,
// weights and the gradients of inputs and parameters, over
// tests/fixtures/make_parity_fixtures.py's cases, which cover every constructor and forward
// argument; and against the Python torchmha.MultiHeadAttention for the grouped-query and rotary
// options, which PyTorch's module lacks.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torchmha/torchmha.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>

namespace {

// Against PyTorch's own implementation; against the Python torchmha module (the same op, so
// only the order of the module's own steps could differ), tighter.
constexpr double kPyTorchTolerance = 1e-10;
constexpr double kTorchmhaTolerance = 1e-12;

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

std::optional<int64_t> optional_option(const Dict& config, const std::string& name) {
  return config.contains(name) ? std::optional<int64_t>(config.at(name).toInt()) : std::nullopt;
}

std::optional<double> optional_double(const Dict& config, const std::string& name) {
  return config.contains(name) ? std::optional<double>(config.at(name).toDouble()) : std::nullopt;
}

torch::Tensor optional_tensor(const Dict& dict, const std::string& name) {
  return dict.contains(name) ? dict.at(name).toTensor() : torch::Tensor();
}

torchmha::MultiHeadAttentionOptions module_options(const Dict& config) {
  const auto embed_dim = option(config, "embed_dim", 0);
  return torchmha::MultiHeadAttentionOptions(embed_dim, option(config, "num_heads", 0))
      .bias(option(config, "bias", 1) != 0)
      .add_bias_kv(option(config, "add_bias_kv", 0) != 0)
      .add_zero_attn(option(config, "add_zero_attn", 0) != 0)
      .kdim(option(config, "kdim", embed_dim))
      .vdim(option(config, "vdim", embed_dim))
      .batch_first(option(config, "batch_first", 0) != 0)
      .num_kv_heads(optional_option(config, "num_kv_heads"))
      .rope_theta(optional_double(config, "rope_theta"))
      .rotary_dim(optional_option(config, "rotary_dim"))
      .rotary_interleaved(option(config, "rotary_interleaved", 0) != 0);
}

// Which module computed the fixture decides how close the C++ module must come.
double tolerance_for(const Dict& fixture) {
  const auto reference = fixture.at("reference").toStringRef();
  if (reference == "torchmha.MultiHeadAttention") {
    return kTorchmhaTolerance;
  }
  EXPECT_EQ(reference, "torch.nn.MultiheadAttention");
  return kPyTorchTolerance;
}

void expect_close(const torch::Tensor& actual, const torch::Tensor& expected, double tolerance,
                  const std::string& what) {
  ASSERT_TRUE(actual.defined()) << what;
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  EXPECT_LE((actual - expected).abs().max().item<double>(), tolerance) << what;
}

void check_case(const std::string& name) {
  SCOPED_TRACE(name);
  const auto fixture = read_case(name);
  const auto config = fixture.at("config").toGenericDict();
  const auto flags = fixture.at("flags").toGenericDict();
  const auto tolerance = tolerance_for(fixture);
  torchmha::MultiHeadAttention attention(module_options(config));
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
  const auto positions = fixture.at("positions").toGenericDict();
  const bool need_weights = flags.at("need_weights").toInt() != 0;
  const auto [output, weights] = attention->forward(
      query, key, value, optional_tensor(masks, "key_padding_mask"), need_weights,
      optional_tensor(masks, "attn_mask"), flags.at("average_attn_weights").toInt() != 0,
      flags.at("is_causal").toInt() != 0, optional_tensor(positions, "positions"));

  expect_close(output, fixture.at("output").toTensor(), tolerance, "output");
  if (need_weights) {
    expect_close(weights, fixture.at("weights").toTensor(), tolerance, "weights");
  }
  (output * fixture.at("cotangent").toTensor()).sum().backward();
  const auto input_grads = fixture.at("input_grads").toGenericDict();
  expect_close(query.grad(), input_grads.at("query").toTensor(), tolerance, "query grad");
  if (inputs.contains("key")) {
    expect_close(key.grad(), input_grads.at("key").toTensor(), tolerance, "key grad");
    expect_close(value.grad(), input_grads.at("value").toTensor(), tolerance, "value grad");
  }
  const auto parameter_grads = fixture.at("parameter_grads").toGenericDict();
  for (const auto& parameter : attention->named_parameters()) {
    expect_close(parameter.value().grad(), parameter_grads.at(parameter.key()).toTensor(),
                 tolerance, parameter.key() + " grad");
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
  EXPECT_GE(cases, 15) << "fewer cases than tests/fixtures/make_parity_fixtures.py writes";
}

}  // namespace
