// CPU entry points of the ELSA operator: one kernel family, the channels-last one.
//
// NCHW inputs are converted to channels-last once here and the results converted back, so that the
// output layout follows the features, as for convolutions (see is_channels_last); channels-last callers
// (the models) pay no copy. Every kernel gathers, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../elsa_common.h"
#include "launch.h"

namespace elsa_op {
namespace {

at::Tensor forward_cpu(const at::Tensor& features, const at::Tensor& h_attn, const std::optional<at::Tensor>& ghost_mul,
                       const std::optional<at::Tensor>& ghost_add, int64_t kernel_size, int64_t dilation,
                       int64_t stride) {
  const auto g = check_forward_args(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride);
  return to_caller_layout(cpu::launch_forward(g, features, h_attn, ghost_mul, ghost_add), is_channels_last(features));
}

at::Tensor backward_features_cpu(const at::Tensor& grad_out, const at::Tensor& h_attn,
                                 const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add,
                                 int64_t height, int64_t width, int64_t kernel_size, int64_t dilation, int64_t stride) {
  const auto g = check_backward_features_args(grad_out, h_attn, ghost_mul, ghost_add, height, width, kernel_size,
                                              dilation, stride);
  return to_caller_layout(cpu::launch_backward_features(g, grad_out, h_attn, ghost_mul, ghost_add),
                          is_channels_last(grad_out));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_attn_ghost_cpu(
    const at::Tensor& grad_out, const at::Tensor& features, const std::optional<at::Tensor>& h_attn,
    const std::optional<at::Tensor>& ghost_mul, int64_t groups, int64_t kernel_size, int64_t dilation, int64_t stride,
    bool need_attn, bool need_mul, bool need_add, bool mul_batched, bool add_batched) {
  const auto g = check_backward_attn_ghost_args(grad_out, features, h_attn, ghost_mul, groups, kernel_size, dilation,
                                                stride, need_mul);
  const auto gh = need_attn ? to_caller_layout(cpu::launch_backward_attn(g, grad_out, features, ghost_mul),
                                               is_channels_last(features))
                            : at::empty({0}, features.options());
  at::Tensor gm, ga;
  if (need_mul && need_add && mul_batched == add_batched) {
    std::tie(gm, ga) = cpu::launch_backward_ghost(g, grad_out, features, h_attn, mul_batched, true, true);
  } else {
    gm = std::get<0>(cpu::launch_backward_ghost(g, grad_out, features, h_attn, mul_batched, need_mul, false));
    ga = std::get<1>(cpu::launch_backward_ghost(g, grad_out, features, h_attn, add_batched, false, need_add));
  }
  return {gh, gm, ga};
}

}  // namespace

TORCH_LIBRARY_IMPL(elsa_op, CPU, m) {
  m.impl("elsa_forward", &forward_cpu);
  m.impl("elsa_backward_features", &backward_features_cpu);
  m.impl("elsa_backward_attn_ghost", &backward_attn_ghost_cpu);
}

}  // namespace elsa_op
