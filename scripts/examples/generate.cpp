// Greedy generation in pure C++ with a key/value cache: a tiny decoder (an embedding, a
// torchmha::MultiHeadAttention with grouped key/value heads and rotary embeddings, a linear head)
// reads its prompts once into a torchmha::KVCache, then decodes one token at a time.
//
// Usage: torchmha_generate <decoder.pt> <expected.pt>
// <decoder.pt>: the decoder's state dict; <expected.pt>: a torch.save()d dict with "config",
// "prompt" and what Python computed without a cache, "logits" and "tokens"
// (tests/fixtures/make_generation_fixture.py writes both). Prints the tokens and the largest
// logit difference to Python; exits with 1 if a token differs or a logit is off by more than
// kTolerance.
#include <torch/serialize.h>
#include <torch/torch.h>
#include <torchmha/torchmha.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

namespace {

// float32 logits of a few units, computed with and without a cache.
constexpr double kTolerance = 1e-5;

struct TinyDecoderImpl : torch::nn::Module {
  TinyDecoderImpl(int64_t vocab_size, const torchmha::MultiHeadAttentionOptions& options)
      : embedding(
            register_module("embedding", torch::nn::Embedding(vocab_size, options.embed_dim()))),
        attention(register_module("attention", torchmha::MultiHeadAttention(options))),
        head(register_module("head", torch::nn::Linear(options.embed_dim(), vocab_size))) {}

  // Logits (N, L, vocab_size) of the new tokens (N, L), whose keys and values join `cache`.
  torch::Tensor forward(const torch::Tensor& tokens, const torchmha::KVCache& cache) {
    const auto x = embedding(tokens);
    const auto attended = std::get<0>(
        attention->forward(x, x, x, /*key_padding_mask=*/{}, /*need_weights=*/false,
                           /*attn_mask=*/{}, /*average_attn_weights=*/true, /*is_causal=*/true,
                           /*positions=*/{}, cache));
    return head(attended);
  }

  torch::nn::Embedding embedding;
  torchmha::MultiHeadAttention attention;
  torch::nn::Linear head;
};
TORCH_MODULE(TinyDecoder);

c10::Dict<c10::IValue, c10::IValue> read_dict(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  TORCH_CHECK(stream, "cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(stream)),
                                std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toGenericDict();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " <decoder.pt> <expected.pt>\n";
    return 2;
  }
  const auto expected = read_dict(argv[2]);
  const auto config = expected.at("config").toGenericDict();
  const auto options = torchmha::MultiHeadAttentionOptions(config.at("embed_dim").toInt(),
                                                           config.at("num_heads").toInt())
                           .batch_first(true)
                           .num_kv_heads(config.at("num_kv_heads").toInt())
                           .rope_theta(config.at("rope_theta").toDouble());
  TinyDecoder decoder(config.at("vocab_size").toInt(), options);
  torchmha::load_state_dict(*decoder, argv[1]);
  decoder->eval();
  const auto prompt = expected.at("prompt").toTensor();  // (N, prompt length) token ids
  const int64_t new_tokens = config.at("new_tokens").toInt();

  torch::InferenceMode inference;  // a cache is for inference: no autograd
  auto cache = decoder->attention->new_kv_cache(prompt.size(0), prompt.size(1) + new_tokens);
  std::vector<torch::Tensor> steps{decoder(prompt, cache).select(1, -1)};  // prefill
  while (static_cast<int64_t>(steps.size()) < new_tokens) {
    const auto token = steps.back().argmax(-1, /*keepdim=*/true);  // greedy: (N, 1)
    steps.push_back(decoder(token, cache).select(1, -1));          // one token more in the cache
  }
  const auto logits = torch::stack(steps, 1);  // (N, new_tokens, vocab_size)
  const auto tokens = logits.argmax(-1);       // (N, new_tokens)

  const auto difference = (logits - expected.at("logits").toTensor()).abs().max().item<double>();
  const bool same_tokens = torch::equal(tokens, expected.at("tokens").toTensor());
  std::cout << "torchmha_generate: tokens\n"
            << tokens << "\nlargest logit difference to Python: " << difference << "\n";
  if (!same_tokens || difference > kTolerance) {
    std::cerr << "torchmha_generate: MISMATCH with Python ("
              << (same_tokens ? "same tokens" : "other tokens") << ", logits differ by "
              << difference << ", tolerance " << kTolerance << ")\n";
    return 1;
  }
  std::cout << "torchmha_generate: OK, Python's tokens and logits within " << kTolerance << "\n";
  return 0;
}
