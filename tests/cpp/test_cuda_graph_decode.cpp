// A decoding step with a torchmha::KVCache captured into an at::cuda::CUDAGraph and replayed: the
// op checks the cache's lengths inside the graph while the stream captures (a copy to the host is
// refused then), and each replay computes what the eager step computes. Needs a CUDA build of
// LibTorch and a GPU; skipped otherwise.
#include <torchmha/torchmha.h>

#ifdef TORCHMHA_TESTS_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "test_helpers.h"

namespace {

#ifdef TORCHMHA_TESTS_CUDA_GRAPHS
constexpr int64_t kEmbedDim = 32;
constexpr int64_t kPrompt = 5;

torchmha::MultiHeadAttention grouped_rotary_module_on_cuda() {
  torchmha::MultiHeadAttention attention(torchmha::MultiHeadAttentionOptions(kEmbedDim, 4)
                                             .bias(false)
                                             .batch_first(true)
                                             .num_kv_heads(2)
                                             .rope_theta(10000.0));
  attention->to(torch::Device(torch::kCUDA), torch::kFloat64);
  return attention;
}

// The module's step over `token` at cache length kPrompt (the lengths rewound first).
torch::Tensor step_at_prompt(torchmha::MultiHeadAttention& attention,
                             const torchmha::KVCache& cache, const torch::Tensor& token) {
  cache->seq_lens.fill_(kPrompt);
  return std::get<0>(attention->forward(token, token, token, {}, /*need_weights=*/false, {},
                                        /*average_attn_weights=*/true, /*is_causal=*/true, {},
                                        cache));
}
#endif

TEST(CudaGraphDecoding, ReplayedStepEqualsTheEagerStep) {
#ifndef TORCHMHA_TESTS_CUDA_GRAPHS
  GTEST_SKIP() << "LibTorch without CUDA";
#else
  if (!torch::cuda::is_available()) {
    GTEST_SKIP() << "no CUDA device";
  }
  torch::manual_seed(0);
  auto attention = grouped_rotary_module_on_cuda();
  const auto options = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat64);
  const auto prompt = torch::randn({2, kPrompt, kEmbedDim}, options);
  const auto token = torch::randn({2, 1, kEmbedDim}, options);
  const c10::InferenceMode inference;
  const auto eager_cache = attention->new_kv_cache(2, 16);
  const auto graph_cache = attention->new_kv_cache(2, 16);
  for (const auto* cache : {&eager_cache, &graph_cache}) {
    attention->forward(prompt, prompt, prompt, {}, false, {}, true, /*is_causal=*/true, {}, *cache);
  }
  const auto expected = step_at_prompt(attention, eager_cache, token);

  at::cuda::CUDAGraph graph;
  torch::Tensor replayed;
  {
    torch::cuda::synchronize();
    const c10::cuda::CUDAStreamGuard side_stream(c10::cuda::getStreamFromPool());
    step_at_prompt(attention, graph_cache, token);  // warm-up outside capture
    torch::cuda::synchronize();
    graph.capture_begin();
    replayed = step_at_prompt(attention, graph_cache, token);
    graph.capture_end();
  }
  graph_cache->key.zero_();  // the replays must write the step's keys and values themselves
  graph_cache->value.zero_();
  attention->forward(prompt, prompt, prompt, {}, false, {}, true, true, {}, graph_cache);
  for (int replay = 0; replay < 2; ++replay) {
    graph.replay();
    torch::cuda::synchronize();
    EXPECT_TRUE(torch::allclose(replayed, expected, 1e-12, 1e-12)) << "replay " << replay;
    EXPECT_TRUE(torch::allclose(graph_cache->key, eager_cache->key, 1e-12, 1e-12));
    EXPECT_TRUE(torch::allclose(graph_cache->value, eager_cache->value, 1e-12, 1e-12));
    EXPECT_TRUE(torch::equal(graph_cache->seq_lens, eager_cache->seq_lens));
  }
#endif
}

}  // namespace
