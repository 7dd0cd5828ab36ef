// Times multi-head attention from a pure C++ loop (no Python): torchmha::MultiHeadAttention and
// LibTorch's torch::nn::MultiheadAttention, on weights and an input that bench.py saved.
//
// Usage: torchmha_bench <state_dict.pt> <input.pt> <num_heads> <cpu|cuda>
//                       <float32|bfloat16|float16> <inference|training> <threads> <rounds> <calls>
// Prints one JSON line per candidate: {"candidate": ..., "ms": [per-call ms, one per round],
// "peak_bytes": ...}. The candidates take turns every round, so drifting machine load is shared.
#include <torch/serialize.h>
#include <torch/torch.h>
#include <torchmha/torchmha.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

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

}  // namespace

int main(int argc, char** argv) {
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
