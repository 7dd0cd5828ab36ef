// One module shared by eight threads doing inference at once gives the results of a serial run.
// scripts/sanitize.sh also runs this test under ThreadSanitizer.
#include <torchmha/torchmha.h>

#include <thread>

#include "test_helpers.h"

namespace {

constexpr int kThreads = 8;
constexpr int kCallsPerThread = 40;

struct Call {
  torch::Tensor query, memory, key_padding_mask;
  bool need_weights;
};

// Distinct inputs per call: self- and cross-attention, with and without padding and weights.
std::vector<Call> make_calls() {
  std::vector<Call> calls;
  for (int index = 0; index < kThreads * kCallsPerThread; ++index) {
    const auto query = torch::randn({4 + index % 3, 2, 16});
    const bool cross = index % 2 == 1;
    const auto memory = cross ? torch::randn({6, 2, 16}) : query;
    auto padding = torch::rand({2, memory.size(0)}) < 0.3;
    padding.index_put_({torch::indexing::Slice(), 0}, false);  // every query keeps a key
    calls.push_back({query, memory, index % 4 < 2 ? padding : torch::Tensor(), index % 3 != 0});
  }
  return calls;
}

std::tuple<torch::Tensor, torch::Tensor> run(torchmha::MultiHeadAttention& attention,
                                             const Call& call) {
  return attention->forward(call.query, call.memory, call.memory, call.key_padding_mask,
                            call.need_weights);
}

TEST(Concurrency, EightThreadsShareOneModuleAndMatchASerialRun) {
  // One intra-op thread: the eight threads are the parallelism under test, and results are then
  // bitwise reproducible (OpenMP, which ThreadSanitizer cannot see into, stays out of it too).
  torch::set_num_threads(1);
  torch::manual_seed(0);
  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(16, 4).dropout(0.25).add_bias_kv(true));
  attention->eval();
  const auto calls = make_calls();

  std::vector<std::tuple<torch::Tensor, torch::Tensor>> serial;
  {
    torch::NoGradGuard no_grad;
    for (const auto& call : calls) {
      serial.push_back(run(attention, call));
    }
  }

  std::vector<std::tuple<torch::Tensor, torch::Tensor>> concurrent(calls.size());
  std::vector<std::thread> threads;
  for (int thread = 0; thread < kThreads; ++thread) {
    threads.emplace_back([&, thread] {
      // OpenMP's thread count and autograd's mode are per thread: take the process's setting
      // (as LibTorch's own workers do), else kernels split sums differently and round apart.
      at::init_num_threads();
      torch::NoGradGuard no_grad;
      // Interleaved: thread t takes calls t, t + 8, ..., so threads run different shapes at once.
      for (size_t index = thread; index < calls.size(); index += kThreads) {
        concurrent[index] = run(attention, calls[index]);
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }

  for (size_t index = 0; index < calls.size(); ++index) {
    const auto& [output, weights] = concurrent[index];
    const auto& [expected_output, expected_weights] = serial[index];
    ASSERT_TRUE(torch::equal(output, expected_output)) << "call " << index;
    ASSERT_EQ(weights.defined(), expected_weights.defined()) << "call " << index;
    if (weights.defined()) {
      ASSERT_TRUE(torch::equal(weights, expected_weights)) << "call " << index;
    }
  }
}

}  // namespace
