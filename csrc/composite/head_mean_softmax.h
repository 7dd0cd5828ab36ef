#pragma once

// torchmha::_head_mean_softmax: need_weights' head-averaged attention weights from the scores, an
// op of its own so that a device may bring a kernel that never writes each head's probabilities
// (csrc/cuda/head_mean_softmax.cu). Every other device runs the ATen composition.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

namespace torchmha::composite {

// mean over H of softmax(scores, -1) for (N, H, L, S) scores: (N, L, S). A head's row whose
// scores are all -inf (every key masked) adds zero to the mean. Differentiable.
at::Tensor head_mean_softmax(const at::Tensor& scores);

// True when `device` has a kernel of its own for the op (not the ATen composition).
bool has_head_mean_softmax_kernel(c10::DeviceType device);

}  // namespace torchmha::composite
