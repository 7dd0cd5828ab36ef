// 10,000 forward+backward calls keep resident memory flat: no per-call leak or growth.
#include <torchmha/torchmha.h>
#include <unistd.h>

#include <fstream>

#include "test_helpers.h"

namespace {

// The bound: a leak of even one small tensor per call (~0.5 KiB with its TensorImpl and
// storage) would grow by ~5 MiB over 10,000 calls.
constexpr int64_t kMaxGrowthBytes = 2 * 1024 * 1024;
constexpr int kCalls = 10000;
constexpr int kWarmUpCalls = 1000;

int64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t total_pages = 0;
  int64_t resident_pages = 0;
  statm >> total_pages >> resident_pages;
  return resident_pages * sysconf(_SC_PAGESIZE);
}

TEST(Memory, TenThousandForwardBackwardCallsKeepResidentMemoryFlat) {
  torch::set_num_threads(1);
  torch::manual_seed(0);
  // Dropout, padding masks, weights and both attention paths: every branch of the op allocates.
  torchmha::MultiHeadAttention attention(
      torchmha::MultiHeadAttentionOptions(16, 4).dropout(0.1).add_bias_kv(true));
  auto padding = torch::zeros({2, 6}, torch::kBool);
  padding.index_put_({1, torch::indexing::Slice(4)}, true);
  const auto call = [&](int index) {
    const auto query = torch::randn({5, 2, 16}, torch::requires_grad());
    const auto memory = torch::randn({6, 2, 16}, torch::requires_grad());
    const bool need_weights = index % 2 == 0;
    auto [output, weights] = attention->forward(query, memory, memory, padding, need_weights);
    auto loss = output.square().sum();
    if (need_weights) {
      loss = loss + weights.sum();
    }
    loss.backward();
    attention->zero_grad();
  };
  // Warm-up fills the allocator's free lists and LibTorch's lazily built tables.
  for (int index = 0; index < kWarmUpCalls; ++index) {
    call(index);
  }
  const int64_t before = resident_bytes();
  for (int index = 0; index < kCalls; ++index) {
    call(index);
  }
  const int64_t growth = resident_bytes() - before;
  RecordProperty("rss_before_kib", static_cast<int>(before / 1024));
  RecordProperty("rss_growth_kib", static_cast<int>(growth / 1024));
  std::cout << "RSS before: " << before / 1024 << " KiB, growth over " << kCalls
            << " calls: " << growth / 1024 << " KiB (bound " << kMaxGrowthBytes / 1024 << " KiB)\n";
#if defined(__SANITIZE_ADDRESS__)
  // ASan's quarantine holds freed memory back, so RSS says nothing here; LeakSanitizer checks
  // this loop for leaks when the process exits instead.
  GTEST_SKIP() << "RSS bound not checked under AddressSanitizer; LeakSanitizer checks at exit";
#endif
  EXPECT_LE(growth, kMaxGrowthBytes);
}

}  // namespace
