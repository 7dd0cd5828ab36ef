// torchmha::KVCache: the buffers of a key/value cache; the op writes and reads them.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torchmha/kv_cache.h>

#include <string>
#include <utility>
#include <vector>

namespace torchmha {

KVCacheOptions::KVCacheOptions(int64_t batch_size, int64_t num_kv_heads, int64_t max_seq_len,
                               int64_t head_dim)
    : batch_size_(batch_size),
      num_kv_heads_(num_kv_heads),
      max_seq_len_(max_seq_len),
      head_dim_(head_dim) {}

KVCacheImpl::KVCacheImpl(const KVCacheOptions& options_) : options(options_) {
  const std::pair<int64_t, const char*> sizes[] = {{options.batch_size(), "batch_size"},
                                                   {options.num_kv_heads(), "num_kv_heads"},
                                                   {options.max_seq_len(), "max_seq_len"},
                                                   {options.head_dim(), "head_dim"}};
  for (const auto& [size, name] : sizes) {
    TORCH_CHECK_VALUE(size > 0, "torchmha::KVCache: `", name, "` must be positive, got ", size);
  }
  reset();
}

void KVCacheImpl::reset() {
  // Buffers registered: empty them in place. None (a new cache, or Cloneable::clone's copy,
  // which shares the original's tensors until it registers its own): create them.
  if (!buffers(/*recurse=*/false).empty()) {
    const c10::NoGradGuard no_grad;
    key.zero_();
    value.zero_();
    seq_lens.zero_();
    return;
  }
  const auto tensor_options = at::TensorOptions().dtype(options.dtype()).device(options.device());
  // Zeros, not empty: masked positions must hold finite numbers (0 * NaN would be NaN).
  const std::vector<int64_t> shape{options.batch_size(), options.num_kv_heads(),
                                   options.max_seq_len(), options.head_dim()};
  key = register_buffer("key", at::zeros(shape, tensor_options));
  value = register_buffer("value", at::zeros(shape, tensor_options));
  seq_lens = register_buffer("seq_lens",
                             at::zeros({options.batch_size()}, tensor_options.dtype(at::kLong)));
}

void KVCacheImpl::to(torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(dtype, non_blocking);
  keep_lengths_int64();
}

void KVCacheImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(device, dtype, non_blocking);
  keep_lengths_int64();
}

void KVCacheImpl::keep_lengths_int64() {
  // Module::to casts every buffer; lengths are counts, whatever the keys' dtype.
  seq_lens.set_data(seq_lens.to(at::kLong));
}

void KVCacheImpl::reorder(const at::Tensor& indices) {
  const int64_t batch_size = key.size(0);
  TORCH_CHECK(indices.defined() && !at::isFloatingType(indices.scalar_type()) &&
                  !at::isComplexType(indices.scalar_type()) && indices.scalar_type() != at::kBool &&
                  indices.dim() == 1 && indices.size(0) == batch_size,
              "torchmha::KVCache::reorder: expected integer `indices` of shape [batch_size] = [",
              batch_size, "], but got ",
              indices.defined() ? c10::str(indices.scalar_type(), " of shape ", indices.sizes())
                                : std::string("an undefined tensor"));
  const auto on_device = indices.to(seq_lens.device(), at::kLong);
  if (on_device.numel() > 0) {
    const int64_t low = on_device.min().item<int64_t>();
    const int64_t high = on_device.max().item<int64_t>();
    TORCH_CHECK(low >= 0 && high < batch_size,
                "torchmha::KVCache::reorder: `indices` must be in [0, ", batch_size, "), but got ",
                low < 0 ? low : high);
  }
  const c10::NoGradGuard no_grad;
  // index_select copies first, so entries that move into each other's places stay intact.
  for (auto* buffer : {&key, &value, &seq_lens}) {
    buffer->copy_(buffer->index_select(0, on_device));
  }
}

void KVCacheImpl::pretty_print(std::ostream& stream) const {
  stream << "torchmha::KVCache(batch_size=" << key.size(0) << ", num_kv_heads=" << key.size(1)
         << ", max_seq_len=" << key.size(2) << ", head_dim=" << key.size(3)
         << ", dtype=" << key.scalar_type() << ")";
}

}  // namespace torchmha
