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

  // The op itself, arguments by name (the schema's defaults for the rest).
  const auto [causal_output, no_weights] = torchmha::multi_head_attention(
      x, x, x,
      torchmha::MultiHeadAttentionFuncOptions(4, attention->out_proj->weight)
          .in_proj_weight(attention->in_proj_weight)
          .in_proj_bias(attention->in_proj_bias)
          .out_proj_bias(attention->out_proj->bias)
          .need_weights(false)
          .is_causal(true)
          .batch_first(true));

  torchmha::TextbookMultiHeadAttention textbook(/*h=*/4, /*d_model=*/16);
  const auto chapter_output = textbook(x, x, x);  // textbook->attn: per-head probabilities
  std::cout << "op output " << causal_output.sizes() << ", textbook output "
            << chapter_output.sizes() << ", probabilities " << textbook->attn.sizes() << "\n";

  auto model = torch::jit::load(argv[1]);
  model.eval();
  const auto padding = torch::zeros({2, 7}, torch::kBool);
  const auto scripted = model.forward({x, padding}).toTensor();
  std::cout << "scripted model output " << scripted.sizes() << "\n";
  const bool no_weights_returned = !no_weights.defined() || no_weights.numel() == 0;
  const bool shapes_right = output.sizes() == x.sizes() && scripted.sizes() == x.sizes() &&
                            causal_output.sizes() == x.sizes() &&
                            chapter_output.sizes() == x.sizes();
  return shapes_right && no_weights_returned ? 0 : 1;
}
