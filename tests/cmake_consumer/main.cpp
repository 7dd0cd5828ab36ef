// A LibTorch application using torchmha: builds the module, then runs a model scripted in Python.
// Usage: consumer <scripted_model.pt>
#include <torch/script.h>
#include <torchmha/torchmha.h>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: consumer <scripted_model.pt>\n";
    return 2;
  }
  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(16, 4).batch_first(true));
  const auto x = torch::randn({2, 7, 16});
  const auto [output, weights] = attention(x, x, x);
  std::cout << "module output " << output.sizes() << ", weights " << weights.sizes() << "\n";

  auto model = torch::jit::load(argv[1]);
  model.eval();
  const auto padding = torch::zeros({2, 7}, torch::kBool);
  const auto scripted = model.forward({x, padding}).toTensor();
  std::cout << "scripted model output " << scripted.sizes() << "\n";
  return output.sizes() == x.sizes() && scripted.sizes() == x.sizes() ? 0 : 1;
}
