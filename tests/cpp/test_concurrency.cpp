// One module shared by eight threads doing inference at once gives the results of a serial run,
// for the module and for the chapter's adapter (which keeps each call's probabilities in `attn`).
// scripts/sanitize.sh also runs these tests under ThreadSanitizer.
#include <torchmha/torchmha.h>

#include <atomic>
#include <thread>

#include "test_helpers.h"

namespace {

constexpr int kThreads = 8;
constexpr int kCallsPerThread = 40;
// The adapter's calls are short, and each one's write of `attn` is a chance for writes to meet.
constexpr int kTextbookCallsPerThread = 160;

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

struct TextbookCall {
  torch::Tensor query, memory, mask;
};

// Self- and cross-attention, with and without the chapter's (B, 1, 1, S) padding mask.
std::vector<TextbookCall> make_textbook_calls() {
  std::vector<TextbookCall> calls;
  for (int index = 0; index < kThreads * kTextbookCallsPerThread; ++index) {
    const auto query = torch::randn({2, 4 + index % 3, 16});
    const auto memory = index % 2 == 1 ? torch::randn({2, 6, 16}) : query;
    auto mask = torch::rand({2, 1, 1, memory.size(1)}) > 0.3;
    mask.index_put_({torch::indexing::Ellipsis, 0}, true);  // every query keeps a key
    calls.push_back({query, memory, index % 4 < 2 ? mask : torch::Tensor()});
  }
  return calls;
}

torch::Tensor run(torchmha::TextbookMultiHeadAttention& attention, const TextbookCall& call) {
  return attention(call.query, call.memory, call.memory, call.mask);
}

// Probabilities of some call of make_textbook_calls(): (B, h, L, S) = (2, 4, L, S).
bool has_attn_shape(const torch::Tensor& attn) {
  return attn.defined() && attn.dim() == 4 && attn.size(0) == 2 && attn.size(1) == 4;
}

// Probabilities of a whole call: rows that each sum to one.
bool is_whole_attn(const torch::Tensor& attn) {
  return has_attn_shape(attn) && torch::allclose(attn.sum(-1), torch::ones({}, attn.options()));
}

TEST(Concurrency, EightThreadsShareOneTextbookModuleAndMatchASerialRun) {
  torch::set_num_threads(1);  // as above: the eight threads are the parallelism under test
  torch::manual_seed(0);
  torchmha::TextbookMultiHeadAttention attention(/*h=*/4, /*d_model=*/16);
  attention->eval();
  const auto calls = make_textbook_calls();

  std::vector<torch::Tensor> serial_outputs, serial_attn;
  {
    torch::NoGradGuard no_grad;
    for (const auto& call : calls) {
      serial_outputs.push_back(run(attention, call));
      serial_attn.push_back(attention->last_attn());
    }
  }

  std::vector<torch::Tensor> concurrent(calls.size());
  std::atomic<int> running{kThreads};
  // A reader beside the writers sees the probabilities of some call every time (a quick look,
  // so that reads are many; the value left at the end is compared in full below).
  int reads = 0;
  bool every_read_shaped = true;
  std::thread reader([&] {
    do {
      every_read_shaped = every_read_shaped && has_attn_shape(attention->last_attn());
      ++reads;
    } while (running > 0);
  });
  std::vector<std::thread> threads;
  for (int thread = 0; thread < kThreads; ++thread) {
    threads.emplace_back([&, thread] {
      at::init_num_threads();
      torch::NoGradGuard no_grad;
      for (size_t index = thread; index < calls.size(); index += kThreads) {
        concurrent[index] = run(attention, calls[index]);
      }
      --running;
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  reader.join();

  for (size_t index = 0; index < calls.size(); ++index) {
    ASSERT_TRUE(torch::equal(concurrent[index], serial_outputs[index])) << "call " << index;
  }
  EXPECT_TRUE(every_read_shaped) << "of " << reads << " reads";
  // `attn` holds the probabilities of the call that finished last, whichever it was.
  const auto last = attention->last_attn();
  EXPECT_TRUE(std::any_of(serial_attn.begin(), serial_attn.end(), [&](const torch::Tensor& attn) {
    return attn.sizes() == last.sizes() && torch::equal(attn, last);
  }));
}

// A model holding the adapter: cloning it assigns a clone of the adapter to a fresh one.
struct Model : torch::nn::Cloneable<Model> {
  Model() { reset(); }
  void reset() override {
    attention = register_module("attention", torchmha::TextbookMultiHeadAttention(4, 16));
  }
  torchmha::TextbookMultiHeadAttention attention{nullptr};
};

TEST(Concurrency, CloningBesideForwardCopiesTheParametersAndAWholeAttn) {
  torch::set_num_threads(1);
  torch::manual_seed(0);
  auto model = std::make_shared<Model>();
  model->eval();
  const auto calls = make_textbook_calls();
  {
    torch::NoGradGuard no_grad;
    run(model->attention, calls[0]);  // `attn` is defined from here on
  }
  std::atomic<int> running{kThreads};
  std::vector<std::thread> threads;
  for (int thread = 0; thread < kThreads; ++thread) {
    threads.emplace_back([&, thread] {
      at::init_num_threads();
      torch::NoGradGuard no_grad;
      for (size_t index = thread; index < calls.size(); index += kThreads) {
        run(model->attention, calls[index]);
      }
      --running;
    });
  }
  // Module::clone copies the adapter; a model's clone assigns the adapter's clone to its own.
  std::vector<std::shared_ptr<torch::nn::Module>> clones;
  do {
    clones.push_back(model->attention->clone());
    clones.push_back(model->clone());
  } while (running > 0);
  for (auto& thread : threads) {
    thread.join();
  }

  const auto parameters = model->attention->named_parameters();
  for (const auto& clone : clones) {
    auto* attention = clone->as<torchmha::TextbookMultiHeadAttention>();
    if (attention == nullptr) {
      attention = clone->as<Model>()->attention.get();
    }
    ASSERT_NE(attention, model->attention.get());
    EXPECT_TRUE(is_whole_attn(attention->last_attn()));
    for (const auto& parameter : attention->named_parameters()) {
      EXPECT_TRUE(torch::equal(parameter.value(), parameters[parameter.key()])) << parameter.key();
    }
  }
}

}  // namespace
