// The ELSA operator on channels-last CPU tensors (see elsa_common.h's is_channels_last).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../elsa_common.h"

namespace elsa_op {

at::Tensor forward_nhwc(const Geometry<int64_t>& g, const at::Tensor& features, const at::Tensor& h_attn,
                        const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add);

at::Tensor backward_features_nhwc(const Geometry<int64_t>& g, const at::Tensor& grad_out, const at::Tensor& h_attn,
                                  const std::optional<at::Tensor>& ghost_mul,
                                  const std::optional<at::Tensor>& ghost_add);

at::Tensor backward_attn_nhwc(const Geometry<int64_t>& g, const at::Tensor& grad_out, const at::Tensor& features,
                              const std::optional<at::Tensor>& ghost_mul);

std::tuple<at::Tensor, at::Tensor> backward_ghost_nhwc(const Geometry<int64_t>& g, const at::Tensor& grad_out,
                                                       const at::Tensor& features,
                                                       const std::optional<at::Tensor>& h_attn, bool batched,
                                                       bool need_mul, bool need_add);

}  // namespace elsa_op
