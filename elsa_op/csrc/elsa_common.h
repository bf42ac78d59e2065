// Shapes and argument checks shared by the schema, CPU and CUDA translation units.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "geometry.h"

namespace elsa_op {

// Bounds that keep every size and offset computation inside int64 (the window reaches K / 2 * dilation
// past the image, and output positions times the stride stay below the image size plus the stride).
constexpr int64_t kMaxKernelSize = int64_t(1) << 15;
constexpr int64_t kMaxDilationOrStride = (int64_t(1) << 31) - 1;

inline Geometry<int64_t> make_geometry(int64_t B, int64_t C, int64_t H, int64_t W, int64_t G, int64_t K,
                                       int64_t dilation, int64_t stride) {
  TORCH_CHECK(K > 0 && K % 2 == 1 && K <= kMaxKernelSize, "elsa: kernel_size must be a positive odd integer up to ",
              kMaxKernelSize, ", got ", K);
  TORCH_CHECK(dilation > 0 && dilation <= kMaxDilationOrStride, "elsa: dilation must lie in [1, ", kMaxDilationOrStride,
              "], got ", dilation);
  TORCH_CHECK(stride > 0 && stride <= kMaxDilationOrStride, "elsa: stride must lie in [1, ", kMaxDilationOrStride,
              "], got ", stride);
  TORCH_CHECK(G > 0 && C % G == 0, "elsa: channels (", C, ") must be divisible by groups (", G, ")");
  // An empty batch is allowed (empty results, as for convolutions); empty images are not.
  TORCH_CHECK(B >= 0 && C > 0 && H > 0 && W > 0, "elsa: empty input of shape [", B, ", ", C, ", ", H, ", ", W, "]");
  return Geometry<int64_t>{B, C, H, W, G, K, dilation, stride, (H - 1) / stride + 1, (W - 1) / stride + 1};
}

// Every tensor of a call on the device and in the dtype of the first one (a CPU tensor handed to a CUDA
// kernel would fault, not fail).
inline void check_same(const at::Tensor& ref, const at::Tensor& t, const char* name,
                       const char* ref_name = "features") {
  TORCH_CHECK(t.device() == ref.device(), "elsa: ", name, " is on ", t.device(), " but ", ref_name, " on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "elsa: ", name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has ", ref.scalar_type());
}

inline void check_attn(const at::Tensor& h, const Geometry<int64_t>& g) {
  TORCH_CHECK(h.dim() == 5 && h.size(0) == g.B && h.size(1) == g.G && h.size(2) == g.taps() && h.size(3) == g.Ho &&
                  h.size(4) == g.Wo,
              "elsa: h_attn must have shape [", g.B, ", ", g.G, ", ", g.taps(), ", ", g.Ho, ", ", g.Wo, "], got ",
              h.sizes());
}

// The accumulation type of a dtype: float for half and bfloat16 (and float), double for double.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A ghost kernel is on the device of `ref` and in its dtype, or float32 beside half or bfloat16 features:
// under mixed precision the C*K*K ghost values (and their gradients) stay float32.
inline void check_ghost(const at::Tensor& ref, const at::Tensor& t, const Geometry<int64_t>& g, const char* name,
                        const char* ref_name = "features") {
  TORCH_CHECK(t.device() == ref.device(), "elsa: ", name, " is on ", t.device(), " but ", ref_name, " on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type() || t.scalar_type() == accumulation_type(ref.scalar_type()),
              "elsa: ", name, " has dtype ", t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type(),
              " (a ghost kernel takes the features' dtype, or float32 beside half or bfloat16)");
  const bool batched = t.dim() == 4;
  TORCH_CHECK((t.dim() == 3 || batched) && t.size(-3) == g.C && t.size(-2) == g.K && t.size(-1) == g.K &&
                  (!batched || t.size(0) == g.B),
              "elsa: ", name, " must have shape [", g.C, ", ", g.K, ", ", g.K, "] or [", g.B, ", ", g.C, ", ", g.K,
              ", ", g.K, "], got ", t.sizes());
}

inline Geometry<int64_t> check_forward_args(const at::Tensor& features, const at::Tensor& h_attn,
                                            const std::optional<at::Tensor>& ghost_mul,
                                            const std::optional<at::Tensor>& ghost_add, int64_t K, int64_t dilation,
                                            int64_t stride) {
  TORCH_CHECK(features.dim() == 4, "elsa: features must be [B, C, H, W], got ", features.sizes());
  TORCH_CHECK(h_attn.dim() == 5, "elsa: h_attn must be [B, G, K*K, Ho, Wo], got ", h_attn.sizes());
  const auto g = make_geometry(features.size(0), features.size(1), features.size(2), features.size(3), h_attn.size(1),
                               K, dilation, stride);
  check_same(features, h_attn, "h_attn");
  check_attn(h_attn, g);
  if (ghost_mul) check_ghost(features, *ghost_mul, g, "ghost_mul");
  if (ghost_add) check_ghost(features, *ghost_add, g, "ghost_add");
  return g;
}

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& features, const Geometry<int64_t>& g) {
  check_same(features, grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.B && grad_out.size(1) == g.C && grad_out.size(2) == g.Ho &&
                  grad_out.size(3) == g.Wo,
              "elsa: grad_out must have shape [", g.B, ", ", g.C, ", ", g.Ho, ", ", g.Wo, "], got ", grad_out.sizes());
}

inline Geometry<int64_t> check_backward_features_args(const at::Tensor& grad_out, const at::Tensor& h_attn,
                                                      const std::optional<at::Tensor>& ghost_mul,
                                                      const std::optional<at::Tensor>& ghost_add, int64_t height,
                                                      int64_t width, int64_t K, int64_t dilation, int64_t stride) {
  TORCH_CHECK(grad_out.dim() == 4, "elsa: grad_out must be [B, C, Ho, Wo], got ", grad_out.sizes());
  TORCH_CHECK(h_attn.dim() == 5, "elsa: h_attn must be [B, G, K*K, Ho, Wo], got ", h_attn.sizes());
  const auto g = make_geometry(grad_out.size(0), grad_out.size(1), height, width, h_attn.size(1), K, dilation, stride);
  TORCH_CHECK(grad_out.size(2) == g.Ho && grad_out.size(3) == g.Wo, "elsa: grad_out must have shape [", g.B, ", ", g.C,
              ", ", g.Ho, ", ", g.Wo, "] for features of ", height, "x", width, ", got ", grad_out.sizes());
  check_same(grad_out, h_attn, "h_attn", "grad_out");
  check_attn(h_attn, g);
  if (ghost_mul) check_ghost(grad_out, *ghost_mul, g, "ghost_mul", "grad_out");
  if (ghost_add) check_ghost(grad_out, *ghost_add, g, "ghost_add", "grad_out");
  return g;
}

inline Geometry<int64_t> check_backward_attn_ghost_args(const at::Tensor& grad_out, const at::Tensor& features,
                                                        const std::optional<at::Tensor>& h_attn,
                                                        const std::optional<at::Tensor>& ghost_mul, int64_t groups,
                                                        int64_t K, int64_t dilation, int64_t stride, bool need_mul) {
  TORCH_CHECK(features.dim() == 4, "elsa: features must be [B, C, H, W], got ", features.sizes());
  const auto g = make_geometry(features.size(0), features.size(1), features.size(2), features.size(3), groups, K,
                               dilation, stride);
  check_grad_out(grad_out, features, g);
  if (ghost_mul) check_ghost(features, *ghost_mul, g, "ghost_mul");
  TORCH_CHECK(!need_mul || h_attn.has_value(), "elsa: grad_ghost_mul needs h_attn");
  if (need_mul) {
    check_same(features, *h_attn, "h_attn");
    check_attn(*h_attn, g);
  }
  return g;
}

// Gradients of the ghost kernels, shaped like them; one not asked for is an empty tensor.
inline std::tuple<at::Tensor, at::Tensor> empty_ghost_grads(const Geometry<int64_t>& g, bool mul_batched,
                                                            bool add_batched, bool need_mul, bool need_add,
                                                            const at::TensorOptions& options) {
  const auto shape = [&](bool need, bool batched) {
    return !need     ? std::vector<int64_t>{0}
           : batched ? std::vector<int64_t>{g.B, g.C, g.K, g.K}
                     : std::vector<int64_t>{g.C, g.K, g.K};
  };
  return {at::empty(shape(need_mul, mul_batched), options), at::empty(shape(need_add, add_batched), options)};
}

// Channels-last tensors (unit channel stride) take the channels-last kernels and get channels-last
// results, as convolutions do; _registration.py's fake kernels follow the same rule. For features and grad_out.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.size(1) > 1 && t.stride(1) == 1;
}

// A result of the channels-last kernels (either device) in the caller's layout: unchanged for channels-last
// callers, made contiguous (NCHW, or [B, G, K*K, Ho, Wo] attention) for the others.
inline at::Tensor to_caller_layout(const at::Tensor& result, bool channels_last) {
  return channels_last ? result : result.contiguous();
}

}  // namespace elsa_op
