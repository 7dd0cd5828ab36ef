// Runs a scripted model that calls torchmha's op, using nothing of torchmha directly.
// Usage: consumer_scripted_only <scripted_model.pt>; prints whether the op is registered.
#ifndef CONSUMER_WITHOUT_TORCHMHA_HEADER
#include <torchmha/torchmha.h>
#endif
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/script.h>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " <scripted_model.pt>\n";
    return 2;
  }
  const bool registered =
      c10::Dispatcher::singleton().findSchema({"torchmha::multi_head_attention", ""}).has_value();
  std::cout << "torchmha::multi_head_attention " << (registered ? "registered" : "missing") << "\n";
  if (!registered) {
    return 1;
  }
  auto model = torch::jit::load(argv[1]);
  model.eval();
  const auto output =
      model.forward({torch::randn({2, 7, 16}), torch::zeros({2, 7}, torch::kBool)}).toTensor();
  std::cout << "scripted model output " << output.sizes() << "\n";
  return 0;
}
