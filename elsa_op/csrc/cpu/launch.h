// The ELSA operator on CPU tensors: the host side of the kernels (layouts, dtypes, threads). Results are
// channels-last; register.cpp hands them back in the caller's layout.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../elsa_common.h"

namespace elsa_op::cpu {

at::Tensor launch_forward(const Geometry<int64_t>& g, const at::Tensor& features, const at::Tensor& h_attn,
                          const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add);

at::Tensor launch_backward_features(const Geometry<int64_t>& g, const at::Tensor& grad_out, const at::Tensor& h_attn,
                                    const std::optional<at::Tensor>& ghost_mul,
                                    const std::optional<at::Tensor>& ghost_add);

// The attention gradient as a [B, G, K*K, Ho, Wo] view of [B, Ho, Wo, G, K*K] memory.
at::Tensor launch_backward_attn(const Geometry<int64_t>& g, const at::Tensor& grad_out, const at::Tensor& features,
                                const std::optional<at::Tensor>& ghost_mul);

// The ghost gradients asked for, batched or broadcast alike; one not asked for is an empty tensor.
std::tuple<at::Tensor, at::Tensor> launch_backward_ghost(const Geometry<int64_t>& g, const at::Tensor& grad_out,
                                                         const at::Tensor& features,
                                                         const std::optional<at::Tensor>& h_attn, bool batched,
                                                         bool need_mul, bool need_add);

}  // namespace elsa_op::cpu
