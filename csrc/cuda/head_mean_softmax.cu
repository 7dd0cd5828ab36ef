// torchmha::_head_mean_softmax on CUDA (schema and semantics: csrc/composite/head_mean_softmax.h).
// A block per (batch entry, query row) finds each head's row maximum and sum, then writes the
// mean over heads of exp(x - max) / sum. The second pass re-reads the block's rows just read (meant
// to come from the L2 cache), and no head's probabilities are written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace torchmha::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
constexpr int64_t kMaxSharedBytes = 48 * 1024;

// `vec` consecutive elements, loaded or stored as one aligned access.
template <typename scalar_t, int vec>
struct alignas(sizeof(scalar_t) * vec) Pack {
  scalar_t values[vec];
};

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t negative_infinity() {
  return static_cast<acc_t>(-INFINITY);  // a host-only numeric_limits call is not allowed here
}

// A softmax row's running maximum and sum of exp(x - maximum).
template <typename acc_t>
struct RowStats {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> merge(RowStats<acc_t> a, RowStats<acc_t> b) {
  // NaN never wins the comparison; it reaches the sum through exp(NaN - max) instead.
  const acc_t max = a.max > b.max ? a.max : b.max;
  if (max == negative_infinity<acc_t>()) {
    return {max, a.sum + b.sum};  // only -inf so far: sums are 0, or NaN if a NaN was seen
  }
  return {max, a.sum * exp_of(a.max - max) + b.sum * exp_of(b.max - max)};
}

template <typename acc_t, typename scalar_t, int vec>
__device__ __forceinline__ RowStats<acc_t> stats_of(const Pack<scalar_t, vec>& pack) {
  acc_t max = negative_infinity<acc_t>();
#pragma unroll
  for (int i = 0; i < vec; ++i) {
    const acc_t x = static_cast<acc_t>(pack.values[i]);
    max = x > max ? x : max;
  }
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < vec; ++i) {
    const acc_t x = static_cast<acc_t>(pack.values[i]);
    sum += x == negative_infinity<acc_t>() ? acc_t(0) : exp_of(x - max);
  }
  return {max, sum};
}

template <typename scalar_t, typename acc_t, int vec>
__global__ void __launch_bounds__(kMaxThreads)
    head_mean_softmax_kernel(const scalar_t* __restrict__ scores, scalar_t* __restrict__ weights,
                             int64_t heads, int64_t target_len, int64_t source_len) {
  using PackT = Pack<scalar_t, vec>;
  extern __shared__ __align__(sizeof(double)) unsigned char shared[];
  acc_t* row_max = reinterpret_cast<acc_t*>(shared);
  acc_t* row_scale = row_max + heads;  // 1 / sum, or 0 for a row of -inf (adds nothing)

  const int64_t batch = blockIdx.x / target_len;
  const int64_t query_row = blockIdx.x % target_len;
  const int64_t packs = source_len / vec;
  const int64_t head_stride = target_len * source_len;
  const scalar_t* rows = scores + (batch * heads * target_len + query_row) * source_len;

  // Pass 1: a warp per head row, its maximum and sum.
  const int lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  for (int64_t head = threadIdx.x / kWarpSize; head < heads; head += warps) {
    const auto* row = reinterpret_cast<const PackT*>(rows + head * head_stride);
    RowStats<acc_t> stats{negative_infinity<acc_t>(), acc_t(0)};
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      stats = merge(stats, stats_of<acc_t>(row[p]));
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const RowStats<acc_t> other{__shfl_xor_sync(0xffffffffu, stats.max, offset),
                                  __shfl_xor_sync(0xffffffffu, stats.sum, offset)};
      stats = merge(stats, other);
    }
    if (lane == 0) {
      const bool all_masked = stats.max == negative_infinity<acc_t>() && stats.sum == acc_t(0);
      row_max[head] = all_masked ? acc_t(0) : stats.max;
      row_scale[head] = all_masked ? acc_t(0) : acc_t(1) / stats.sum;
    }
  }
  __syncthreads();

  // Pass 2: each thread's columns, summed over heads, divided by the head count.
  auto* out = reinterpret_cast<PackT*>(weights + (batch * target_len + query_row) * source_len);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    acc_t total[vec] = {};
    for (int64_t head = 0; head < heads; ++head) {
      const PackT pack = reinterpret_cast<const PackT*>(rows + head * head_stride)[p];
      const acc_t max = row_max[head];
      const acc_t scale = row_scale[head];
#pragma unroll
      for (int i = 0; i < vec; ++i) {
        total[i] += exp_of(static_cast<acc_t>(pack.values[i]) - max) * scale;
      }
    }
    PackT result;
#pragma unroll
    for (int i = 0; i < vec; ++i) {
      result.values[i] = static_cast<scalar_t>(total[i] / static_cast<acc_t>(heads));
    }
    out[p] = result;
  }
}

bool is_aligned(const at::Tensor& tensor, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(tensor.const_data_ptr()) % bytes == 0;
}

template <typename scalar_t>
void launch(const at::Tensor& scores, at::Tensor& weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t heads = scores.size(1);
  const int64_t target_len = scores.size(2);
  const int64_t source_len = scores.size(3);
  const int64_t blocks = scores.size(0) * target_len;
  const int64_t shared_bytes = 2 * heads * static_cast<int64_t>(sizeof(acc_t));
  TORCH_CHECK(shared_bytes <= kMaxSharedBytes, "_head_mean_softmax: ", heads,
              " heads need more shared memory than one block has");
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "_head_mean_softmax: batch * target length is too large: ", blocks);

  // 16-byte accesses where every row starts on a 16-byte boundary.
  constexpr int wide = 16 / sizeof(scalar_t);
  const bool vectorized =
      source_len % wide == 0 && is_aligned(scores, 16) && is_aligned(weights, 16);
  const int64_t packs = vectorized ? source_len / wide : source_len;
  const int threads = static_cast<int>(
      std::clamp<int64_t>((packs + kWarpSize - 1) / kWarpSize * kWarpSize, 64, kMaxThreads));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* in = scores.const_data_ptr<scalar_t>();
  auto* out = weights.mutable_data_ptr<scalar_t>();
  if (vectorized) {
    head_mean_softmax_kernel<scalar_t, acc_t, wide>
        <<<blocks, threads, shared_bytes, stream>>>(in, out, heads, target_len, source_len);
  } else {
    head_mean_softmax_kernel<scalar_t, acc_t, 1>
        <<<blocks, threads, shared_bytes, stream>>>(in, out, heads, target_len, source_len);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor cuda_head_mean_softmax(const at::Tensor& input_scores) {
  TORCH_CHECK(input_scores.dim() == 4, "_head_mean_softmax: expected (N, H, L, S) scores, got ",
              input_scores.sizes());
  const auto scores = input_scores.contiguous();
  const c10::cuda::CUDAGuard device_guard(scores.device());
  auto weights = at::empty({scores.size(0), scores.size(2), scores.size(3)}, scores.options());
  if (weights.numel() == 0) {
    return weights;
  }
  TORCH_CHECK(scores.size(1) > 0, "_head_mean_softmax: no heads to average");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "head_mean_softmax", [&] { launch<scalar_t>(scores, weights); });
  return weights;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmha, CUDA, m) { m.impl("_head_mean_softmax", &cuda_head_mean_softmax); }

}  // namespace torchmha::cuda
