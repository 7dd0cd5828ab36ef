// Times multi-head attention from a pure C++ loop (no Python): torchmha::MultiHeadAttention and
// LibTorch's torch::nn::MultiheadAttention, on weights and an input that bench.py saved.
//
// Usage: torchmha_bench <state_dict.pt> <input.pt> <num_heads> <cpu|cuda>
//                       <float32|bfloat16|float16> <inference|training> <threads> <rounds> <calls>
// Prints one JSON line per candidate: {"candidate": ..., "ms": [per-call ms, one per round],
// "peak_bytes": ...}. The candidates take turns every round, so drifting machine load is shared.
//
// Decoding mode (bench.py --suite decode): one generated token of grouped-query causal
// self-attention with rotary embeddings and a torchmha::KVCache, eager and, in a CUDA build on a
// GPU, captured once into an at::cuda::CUDAGraph and replayed per token:
//   torchmha_bench decode <state_dict.pt> <key_block.pt> <value_block.pt> <token.pt>
//                  <expected.pt> <num_heads> <num_kv_heads> <rope_theta> <prompt> <max_seq_len>
//                  <cpu|cuda> <dtype> <threads> <rounds> <calls>
// The cache's first <prompt> slots hold the key and value blocks repeated along the slots, as
// bench.py fills its caches; each step decodes position <prompt> (the lengths rewound inside the
// step). Each line also gives the step's largest absolute difference
// from <expected.pt> (Python's torchmha step) and, for the graph, from the eager step.
#include <torch/serialize.h>
#include <torch/torch.h>
#include <torchmha/torchmha.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#ifdef TORCHMHA_BENCH_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

struct Candidate {
  std::string name;
  std::function<torch::Tensor()> forward;
  std::vector<double> milliseconds;
  std::optional<int64_t> peak_bytes;
};

torch::Tensor read_tensor(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  TORCH_CHECK(stream, "torchmha_bench: cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(stream)),
                                std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toTensor();
}

torch::Dtype parse_dtype(const std::string& name) {
  if (name == "float32") return torch::kFloat32;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  TORCH_CHECK(false, "torchmha_bench: unknown dtype ", name);
}

// Resident-set figures from /proc/self/status, in bytes ("VmRSS" now, "VmHWM" the peak).
int64_t status_bytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      return std::stoll(line.substr(field.size() + 1)) * 1024;
    }
  }
  return -1;
}

// Linux resets the peak resident set size when "5" is written to clear_refs.
void reset_peak_rss() { std::ofstream("/proc/self/clear_refs") << "5"; }

void synchronize(const torch::Device& device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize();
  }
}

// Mean milliseconds per call of `calls` back-to-back calls, the device idle before and after.
double milliseconds_per_call(const std::function<void()>& call, const torch::Device& device,
                             int calls) {
  synchronize(device);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) {
    call();
  }
  synchronize(device);
  const std::chrono::duration<double, std::milli> elapsed =
      std::chrono::steady_clock::now() - start;
  return elapsed.count() / calls;
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64).to(a.device())).abs().max().item<double>();
}

#ifdef TORCHMHA_BENCH_CUDA_GRAPHS
// A step captured into a CUDA graph: each replay reruns its kernels with no host work, writing
// into the same output tensor.
struct CapturedStep {
  at::cuda::CUDAGraph graph;
  torch::Tensor output;
};

std::unique_ptr<CapturedStep> capture_step(const std::function<torch::Tensor()>& step) {
  auto captured = std::make_unique<CapturedStep>();
  torch::cuda::synchronize();  // the side stream below does not wait for the default stream
  const c10::cuda::CUDAStreamGuard guard(c10::cuda::getStreamFromPool());
  // Warm-up on the capturing stream: cuBLAS sets up its workspace and plans outside capture.
  for (int i = 0; i < 3; ++i) {
    step();
  }
  torch::cuda::synchronize();
  captured->graph.capture_begin();
  captured->output = step();
  captured->graph.capture_end();
  torch::cuda::synchronize();
  return captured;
}
#endif

// The first `prompt` slots of `cache` become `block` (batch, kv_heads, slots, head_dim) repeated
// along the slots, converted before repeating as bench.py does.
void fill_cache(const torch::Tensor& cache, const torch::Tensor& block, int64_t prompt) {
  const int64_t repeats = (prompt + block.size(2) - 1) / block.size(2);
  const auto tiled = block.to(cache.device(), cache.scalar_type()).repeat({1, 1, repeats, 1});
  cache.narrow(2, 0, prompt).copy_(tiled.narrow(2, 0, prompt));
}

struct DecodeCandidate {
  std::string name;
  std::function<torch::Tensor()> step;  // one step; returns its output
  std::vector<double> milliseconds;
  double diff_vs_expected = 0.0;
  std::optional<double> diff_vs_eager;
};

void print_decode_line(const DecodeCandidate& candidate) {
  std::ostringstream line;
  line.precision(9);
  line << R"({"candidate": ")" << candidate.name << R"(", "ms": [)";
  for (size_t i = 0; i < candidate.milliseconds.size(); ++i) {
    line << (i ? ", " : "") << candidate.milliseconds[i];
  }
  line << R"(], "peak_bytes": null, "max_abs_diff_vs_torchmha": )" << candidate.diff_vs_expected
       << R"(, "max_abs_diff_vs_eager": )";
  if (candidate.diff_vs_eager) {
    line << *candidate.diff_vs_eager;
  } else {
    line << "null";
  }
  line << "}";
  std::cout << line.str() << std::endl;
}

int decode_main(int argc, char** argv) {
  if (argc != 17) {
    std::cerr << "usage: " << argv[0]
              << " decode <state_dict.pt> <cache_key.pt> <cache_value.pt> <token.pt> <expected.pt>"
                 " <num_heads> <num_kv_heads> <rope_theta> <prompt> <max_seq_len> <cpu|cuda>"
                 " <dtype> <threads> <rounds> <calls>\n";
    return 2;
  }
  const int64_t num_heads = std::stoll(argv[7]);
  const int64_t num_kv_heads = std::stoll(argv[8]);
  const double rope_theta = std::stod(argv[9]);
  const int64_t prompt = std::stoll(argv[10]);
  const int64_t max_seq_len = std::stoll(argv[11]);
  const torch::Device device(argv[12]);
  const torch::Dtype dtype = parse_dtype(argv[13]);
  torch::set_num_threads(std::stoi(argv[14]));
  const int rounds = std::stoi(argv[15]);
  const int calls = std::stoi(argv[16]);

  const auto token = read_tensor(argv[5]).to(device, dtype);
  const auto expected = read_tensor(argv[6]);
  torchmha::MultiHeadAttention ours(torchmha::MultiHeadAttentionOptions(token.size(-1), num_heads)
                                        .bias(false)
                                        .batch_first(true)
                                        .num_kv_heads(num_kv_heads)
                                        .rope_theta(rope_theta));
  torchmha::load_state_dict(*ours, argv[2]);
  ours->to(device, dtype);
  ours->eval();
  const auto cache = ours->new_kv_cache(token.size(0), max_seq_len);
  fill_cache(cache->key, read_tensor(argv[3]), prompt);
  fill_cache(cache->value, read_tensor(argv[4]), prompt);

  const c10::InferenceMode inference;
  const auto step = [&] {
    cache->seq_lens.fill_(prompt);  // rewind: every call decodes the same position
    return std::get<0>(ours->forward(token, token, token, /*key_padding_mask=*/{},
                                     /*need_weights=*/false, /*attn_mask=*/{},
                                     /*average_attn_weights=*/true, /*is_causal=*/true,
                                     /*positions=*/{}, cache));
  };
  std::vector<DecodeCandidate> candidates;
  candidates.push_back({"torchmha_cpp", step});
#ifdef TORCHMHA_BENCH_CUDA_GRAPHS
  std::unique_ptr<CapturedStep> captured;
  if (device.is_cuda()) {
    captured = capture_step(step);
    candidates.push_back({"torchmha_cpp_graph", [&] {
                            captured->graph.replay();
                            return captured->output;
                          }});
  }
#endif
  // The eager step's output first: the graph's replay must reproduce it exactly.
  const auto eager_output = step().clone();
  for (auto& candidate : candidates) {
    const auto output = candidate.step();
    candidate.diff_vs_expected = max_abs_diff(output, expected);
    candidate.diff_vs_eager = max_abs_diff(output, eager_output);
  }
  candidates[0].diff_vs_eager.reset();
  for (int round = 0; round < rounds; ++round) {
    for (auto& candidate : candidates) {
      candidate.step();  // untimed, as in bench.py
      candidate.milliseconds.push_back(
          milliseconds_per_call([&] { candidate.step(); }, device, calls));
    }
  }
  for (const auto& candidate : candidates) {
    print_decode_line(candidate);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "decode") {
    return decode_main(argc, argv);
  }
  if (argc != 10) {
    std::cerr << "usage: " << argv[0]
              << " <state_dict.pt> <input.pt> <num_heads> <cpu|cuda> <dtype> <inference|training>"
                 " <threads> <rounds> <calls>\n";
    return 2;
  }
  const int64_t num_heads = std::stoll(argv[3]);
  const torch::Device device(argv[4]);
  const torch::Dtype dtype = parse_dtype(argv[5]);
  const bool training = std::string(argv[6]) == "training";
  torch::set_num_threads(std::stoi(argv[7]));
  const int rounds = std::stoi(argv[8]);
  const int calls = std::stoi(argv[9]);

  const auto input = read_tensor(argv[2]).to(device, dtype).requires_grad_(training);
  const int64_t embed_dim = input.size(-1);
  // LibTorch's module is sequence-first only: it gets the same input as (L, N, E).
  const auto input_seq_first = input.detach().transpose(0, 1).contiguous().requires_grad_(training);

  torchmha::MultiHeadAttention ours(
      torchmha::MultiHeadAttentionOptions(embed_dim, num_heads).batch_first(true));
  torch::nn::MultiheadAttention libtorch(
      torch::nn::MultiheadAttentionOptions(embed_dim, num_heads));
  for (torch::nn::Module* module : {static_cast<torch::nn::Module*>(ours.get()),
                                    static_cast<torch::nn::Module*>(libtorch.get())}) {
    torchmha::load_state_dict(*module, argv[1]);
    module->to(device, dtype);
    module->train(training);
  }

  std::vector<Candidate> candidates(2);
  candidates[0].name = "torchmha_cpp_loop";
  candidates[0].forward = [&] {
    return std::get<0>(ours->forward(input, input, input, {}, /*need_weights=*/false));
  };
  candidates[1].name = "libtorch_mha";
  candidates[1].forward = [&] {
    return std::get<0>(
        libtorch->forward(input_seq_first, input_seq_first, input_seq_first, {}, false));
  };

  const auto call = [&](Candidate& candidate) {
    auto output = candidate.forward();
    if (training) {
      output.to(torch::kFloat32).sum().backward();
    }
  };
  const auto run_all = [&] {
    std::optional<torch::InferenceMode> inference;
    if (!training) {
      inference.emplace();
    }
    for (int round = 0; round < rounds; ++round) {
      for (auto& candidate : candidates) {
        // An untimed call before every round's timed ones (see bench.py); the first also gives
        // the peak memory above what is resident before it.
        if (round == 0) {
          synchronize(device);
          const int64_t before = status_bytes("VmRSS");
          reset_peak_rss();
          call(candidate);
          synchronize(device);
          if (!device.is_cuda()) {
            candidate.peak_bytes = status_bytes("VmHWM") - before;
          }
        } else {
          call(candidate);
        }
        synchronize(device);
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < calls; ++i) {
          call(candidate);
        }
        synchronize(device);
        const std::chrono::duration<double, std::milli> elapsed =
            std::chrono::steady_clock::now() - start;
        candidate.milliseconds.push_back(elapsed.count() / calls);
      }
    }
  };
  run_all();

  for (const auto& candidate : candidates) {
    std::ostringstream line;
    line.precision(9);
    line << R"({"candidate": ")" << candidate.name << R"(", "ms": [)";
    for (size_t i = 0; i < candidate.milliseconds.size(); ++i) {
      line << (i ? ", " : "") << candidate.milliseconds[i];
    }
    line << R"(], "peak_bytes": )";
    if (candidate.peak_bytes) {
      line << *candidate.peak_bytes;
    } else {
      line << "null";
    }
    line << "}";
    std::cout << line.str() << std::endl;
  }
  return 0;
}
