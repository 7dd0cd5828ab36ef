// Runs an AOTInductor package (a .pt2 file made by torch.export and
// torch._inductor.aoti_compile_and_package) from C++: LibTorch only, no Python, no libtorchmha
// (on CPU the torchmha op is compiled into the package as ATen code).
// Usage: aoti_example model.pt2
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <iostream>

int main(int argc, char* argv[]) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " model.pt2\n";
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader package(argv[1]);

    // The inputs the model was exported with: (batch, length, embed_dim) and a padding mask.
    const int64_t length = 5;  // any length in the exported range
    const auto x = torch::randn({2, length, 16});
    auto padding = torch::zeros({2, length}, torch::kBool);
    padding[1][length - 1] = true;  // the second sequence's last position is padding

    const std::vector<torch::Tensor> outputs = package.run({x, padding});
    std::cout << "output of shape " << outputs.at(0).sizes() << ", mean "
              << outputs.at(0).mean().item<float>() << "\n";
  } catch (const std::exception& error) {
    std::cerr << "aoti_example: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
