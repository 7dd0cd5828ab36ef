// Runs torchmha::MultiHeadAttention from C++ on weights and inputs that Python saved.
//
// Usage: torchmha_demo <weights.pt> <inputs.pt> <outputs.pt> [repeats]
// <weights.pt> is a state dict saved by torchmha.save_state_dict (or torch.save of a plain dict);
// <inputs.pt> a torch.save()d dict with "config" (embed_dim, num_heads), "query" and
// "key_padding_mask" (batch first); <outputs.pt> gets "output" and "seconds_per_call".
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
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " <weights.pt> <inputs.pt> <outputs.pt> [repeats]\n";
    return 2;
  }
  const int repeats = argc > 4 ? std::stoi(argv[4]) : 100;
  const auto inputs = read_dict(argv[2]);
  const auto config = inputs.at("config").toGenericDict();
  const auto embed_dim = config.at("embed_dim").toInt();
  const auto num_heads = config.at("num_heads").toInt();

  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(embed_dim, num_heads).batch_first(true));
  torchmha::load_state_dict(*attention, argv[1]);  // checks every key and shape first
  attention->eval();

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
  std::ofstream(argv[3], std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  std::cout << "torchmha_demo: " << attention << "\n";
  return 0;
}
