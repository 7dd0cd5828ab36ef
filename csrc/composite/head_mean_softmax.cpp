// torchmha::_head_mean_softmax: the dispatcher entry, the ATen composition every device without
// a kernel of its own runs (Meta included), and the autograd formula every kernel shares.
#include "head_mean_softmax.h"

#include "attention.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/TensorOptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace torchmha::composite {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const c10::OperatorHandle& head_mean_softmax_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("torchmha::_head_mean_softmax", "");
  return op;
}

// Each head's probabilities, zero on a row whose scores are all -inf. That row's softmax is
// taken of zeros instead, so that no NaN reaches a derivative of any order.
at::Tensor probabilities_of(const at::Tensor& scores) {
  const auto all_masked = scores.isneginf().all(-1, /*keepdim=*/true);
  return scores.masked_fill(all_masked, 0).softmax(-1).masked_fill(all_masked, 0);
}

at::Tensor composite_head_mean_softmax(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 4, "_head_mean_softmax: expected (N, H, L, S) scores, got ",
              scores.sizes());
  return probabilities_of(scores).mean(1);
}

struct HeadMeanSoftmax : public torch::autograd::Function<HeadMeanSoftmax> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& scores) {
    ctx->save_for_backward({scores});
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return head_mean_softmax_op().typed<at::Tensor(const at::Tensor&)>().call(scores);
  }

  // The probabilities are recomputed rather than kept: the forward never wrote them.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto scores = ctx->get_saved_variables()[0];
    const auto probabilities = probabilities_of(scores);
    // Every head's probabilities get 1/H of the weights' gradient; then softmax's backward,
    // P * (dP - rowsum(P * dP)), broadcast over heads instead of expanded into a copy.
    const auto grad_probabilities = (grads[0] / scores.size(1)).unsqueeze(1);
    const auto row_sums = (probabilities * grad_probabilities).sum(-1, /*keepdim=*/true);
    return {probabilities * (grad_probabilities - row_sums)};
  }
};

at::Tensor autograd_head_mean_softmax(const at::Tensor& scores) {
  if (under_function_transform() || scores._fw_grad(/*level=*/0).defined()) {
    // A C++ autograd Function has no forward-mode formula and no torch.func support: there the
    // composition, differentiable through its ATen ops.
    return composite_head_mean_softmax(scores);
  }
  return HeadMeanSoftmax::apply(scores);
}

}  // namespace

at::Tensor head_mean_softmax(const at::Tensor& scores) {
  return head_mean_softmax_op().typed<at::Tensor(const at::Tensor&)>().call(scores);
}

bool has_head_mean_softmax_kernel(c10::DeviceType device) {
  return head_mean_softmax_op().hasKernelForDispatchKey(
      c10::computeDispatchKey(std::nullopt, std::nullopt, device));
}

TORCH_LIBRARY_IMPL(torchmha, CompositeExplicitAutograd, m) {
  m.impl("_head_mean_softmax", &composite_head_mean_softmax);
}

TORCH_LIBRARY_IMPL(torchmha, Autograd, m) {
  m.impl("_head_mean_softmax", &autograd_head_mean_softmax);
}

}  // namespace torchmha::composite
