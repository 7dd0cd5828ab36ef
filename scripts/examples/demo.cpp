// Runs torchmha::MultiHeadAttention from C++ on weights and inputs that Python saved.
//
// Usage: torchmha_demo <inputs.pt> <outputs.pt> [repeats]
// <inputs.pt> is a torch.save()d dict with "state_dict" (name -> tensor), "config" (name -> int)
// and "query"/"key"/"value"/"key_padding_mask"; <outputs.pt> gets "output" and "seconds_per_call".
#include <torch/serialize.h>
#include <torchmha/torchmha.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <iterator>

namespace {

c10::Dict<c10::IValue, c10::IValue> read_dict(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  TORCH_CHECK(stream, "cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(stream)),
                                std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toGenericDict();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " <inputs.pt> <outputs.pt> [repeats]\n";
    return 2;
  }
  const int repeats = argc > 3 ? std::stoi(argv[3]) : 100;
  const auto inputs = read_dict(argv[1]);
  const auto config = inputs.at("config").toGenericDict();
  const auto state_dict = inputs.at("state_dict").toGenericDict();

  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(config.at("embed_dim").toInt(),
                                          config.at("num_heads").toInt())
          .batch_first(config.at("batch_first").toInt() != 0));
  attention->eval();
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : attention->named_parameters()) {
      parameter.value().copy_(state_dict.at(parameter.key()).toTensor());
    }
  }

  const auto query = inputs.at("query").toTensor();
  const auto key_padding_mask = inputs.at("key_padding_mask").toTensor();
  torch::InferenceMode inference;
  const auto run = [&] {
    return std::get<0>(attention(query, query, query, key_padding_mask, /*need_weights=*/false));
  };
  auto output = run();  // warm-up
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < repeats; ++i) {
    output = run();
  }
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;

  c10::impl::GenericDict results(c10::StringType::get(), c10::AnyType::get());
  results.insert("output", output);
  results.insert("seconds_per_call", elapsed.count() / repeats);
  const auto bytes = torch::pickle_save(results);
  std::ofstream(argv[2], std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  std::cout << "torchmha_demo: " << attention << "\n";
  return 0;
}
