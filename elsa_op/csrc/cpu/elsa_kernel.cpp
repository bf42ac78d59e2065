// CPU kernels of the ELSA operator.
//
// Every kernel gathers: each task owns whole output rows, so results do not depend on the number of
// threads and the backward pass is deterministic. Inner loops run over contiguous columns with
// restrict-qualified accumulators so that the compiler vectorises them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../elsa_common.h"

namespace elsa_op {
namespace {

// Rows handed to one task: enough work to amortise the scheduling, about 32k multiply-adds.
inline int64_t grain_for(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

// acc[j] += x[j * stride + off] * (mul * h[j] + add) for j in [j0, j1). The unit-stride branch is
// what the compiler vectorises.
template <typename scalar_t, typename acc_t>
inline void accumulate_weighted(acc_t* __restrict__ acc, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ h, acc_t mul, acc_t add, int64_t off,
                                int64_t stride, int64_t j0, int64_t j1) {
  if (stride == 1) {
    for (int64_t j = j0; j < j1; ++j)
      acc[j] += static_cast<acc_t>(x[j + off]) * (mul * static_cast<acc_t>(h[j]) + add);
  } else {
    for (int64_t j = j0; j < j1; ++j)
      acc[j] += static_cast<acc_t>(x[j * stride + off]) * (mul * static_cast<acc_t>(h[j]) + add);
  }
}

// acc[j] += go[j] * x[j * stride + off] * w[j] for j in [j0, j1); w == nullptr means w[j] == 1.
template <typename scalar_t, typename acc_t>
inline void accumulate_product(acc_t* __restrict__ acc, const scalar_t* __restrict__ go,
                               const scalar_t* __restrict__ x, const scalar_t* __restrict__ w, acc_t mul,
                               int64_t off, int64_t stride, int64_t j0, int64_t j1) {
  if (w != nullptr) {
    for (int64_t j = j0; j < j1; ++j)
      acc[j] += static_cast<acc_t>(go[j]) * static_cast<acc_t>(x[j * stride + off]) * static_cast<acc_t>(w[j]) * mul;
  } else if (stride == 1) {
    for (int64_t j = j0; j < j1; ++j) acc[j] += static_cast<acc_t>(go[j]) * static_cast<acc_t>(x[j + off]) * mul;
  } else {
    for (int64_t j = j0; j < j1; ++j)
      acc[j] += static_cast<acc_t>(go[j]) * static_cast<acc_t>(x[j * stride + off]) * mul;
  }
}

template <typename scalar_t>
void forward_impl(const ElsaGeometry& g, const scalar_t* x, const scalar_t* h, const scalar_t* m,
                  int64_t m_bstride, const scalar_t* a, int64_t a_bstride, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = g.radius(), kk = g.kk(), plane = g.Ho * g.Wo;
  at::parallel_for(0, g.B * g.C * g.Ho, grain_for(kk * g.Wo), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(g.Wo);
    acc_t* acc = buffer.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % g.Ho, bc = row / g.Ho, c = bc % g.C, b = bc / g.C;
      const scalar_t* x_plane = x + bc * g.H * g.W;
      const scalar_t* h_row = h + (b * g.G + c / g.channels_per_group()) * kk * plane + i * g.Wo;
      std::fill(acc, acc + g.Wo, acc_t(0));
      for (int64_t p = 0; p < g.K; ++p) {
        const int64_t y = i * g.stride + (p - r) * g.dilation;
        if (y < 0 || y >= g.H) continue;
        for (int64_t q = 0; q < g.K; ++q) {
          const int64_t tap = p * g.K + q, off = (q - r) * g.dilation;
          const acc_t mul = m ? static_cast<acc_t>(m[b * m_bstride + c * kk + tap]) : acc_t(1);
          const acc_t add = a ? static_cast<acc_t>(a[b * a_bstride + c * kk + tap]) : acc_t(0);
          int64_t j0, j1;
          valid_columns(off, g.stride, g.W, g.Wo, j0, j1);
          accumulate_weighted(acc, x_plane + y * g.W, h_row + tap * plane, mul, add, off, g.stride, j0, j1);
        }
      }
      std::copy(acc, acc + g.Wo, out + row * g.Wo);
    }
  });
}

template <typename scalar_t>
void backward_features_impl(const ElsaGeometry& g, const scalar_t* go, const scalar_t* h, const scalar_t* m,
                            int64_t m_bstride, const scalar_t* a, int64_t a_bstride, scalar_t* gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = g.radius(), kk = g.kk(), plane = g.Ho * g.Wo;
  at::parallel_for(0, g.B * g.C * g.H, grain_for(kk * g.W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(g.W);
    acc_t* acc = buffer.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % g.H, bc = row / g.H, c = bc % g.C, b = bc / g.C;
      const scalar_t* h_plane = h + (b * g.G + c / g.channels_per_group()) * kk * plane;
      std::fill(acc, acc + g.W, acc_t(0));
      for (int64_t p = 0; p < g.K; ++p) {
        const int64_t t = y - (p - r) * g.dilation;
        if (t < 0 || t % g.stride != 0 || t / g.stride >= g.Ho) continue;
        const int64_t i = t / g.stride;
        const scalar_t* go_row = go + (bc * g.Ho + i) * g.Wo;
        for (int64_t q = 0; q < g.K; ++q) {
          const int64_t tap = p * g.K + q, off = (q - r) * g.dilation;
          const acc_t mul = m ? static_cast<acc_t>(m[b * m_bstride + c * kk + tap]) : acc_t(1);
          const acc_t add = a ? static_cast<acc_t>(a[b * a_bstride + c * kk + tap]) : acc_t(0);
          const scalar_t* h_row = h_plane + tap * plane + i * g.Wo;
          int64_t j0, j1;
          valid_columns(off, g.stride, g.W, g.Wo, j0, j1);
          if (g.stride == 1) {
            for (int64_t j = j0; j < j1; ++j)
              acc[j + off] += static_cast<acc_t>(go_row[j]) * (mul * static_cast<acc_t>(h_row[j]) + add);
          } else {
            for (int64_t j = j0; j < j1; ++j)
              acc[j * g.stride + off] += static_cast<acc_t>(go_row[j]) * (mul * static_cast<acc_t>(h_row[j]) + add);
          }
        }
      }
      std::copy(acc, acc + g.W, gx + row * g.W);
    }
  });
}

template <typename scalar_t>
void backward_attn_impl(const ElsaGeometry& g, const scalar_t* go, const scalar_t* x, const scalar_t* m,
                        int64_t m_bstride, scalar_t* gh) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = g.radius(), kk = g.kk(), plane = g.Ho * g.Wo, cpg = g.channels_per_group();
  at::parallel_for(0, g.B * g.G * g.Ho, grain_for(cpg * kk * g.Wo), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(kk * g.Wo);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % g.Ho, bg = row / g.Ho, grp = bg % g.G, b = bg / g.G;
      std::fill(buffer.begin(), buffer.end(), acc_t(0));
      for (int64_t c = grp * cpg; c < (grp + 1) * cpg; ++c) {
        const scalar_t* go_row = go + ((b * g.C + c) * g.Ho + i) * g.Wo;
        const scalar_t* x_plane = x + (b * g.C + c) * g.H * g.W;
        for (int64_t p = 0; p < g.K; ++p) {
          const int64_t y = i * g.stride + (p - r) * g.dilation;
          if (y < 0 || y >= g.H) continue;
          for (int64_t q = 0; q < g.K; ++q) {
            const int64_t tap = p * g.K + q, off = (q - r) * g.dilation;
            const acc_t mul = m ? static_cast<acc_t>(m[b * m_bstride + c * kk + tap]) : acc_t(1);
            int64_t j0, j1;
            valid_columns(off, g.stride, g.W, g.Wo, j0, j1);
            accumulate_product<scalar_t, acc_t>(buffer.data() + tap * g.Wo, go_row, x_plane + y * g.W, nullptr, mul,
                                                off, g.stride, j0, j1);
          }
        }
      }
      scalar_t* dst = gh + bg * kk * plane + i * g.Wo;
      for (int64_t tap = 0; tap < kk; ++tap)
        std::copy(buffer.data() + tap * g.Wo, buffer.data() + (tap + 1) * g.Wo, dst + tap * plane);
    }
  });
}

// One task per ghost kernel (per channel, or per batch element and channel when batched). Products are
// summed element-wise over rows first (vectorised), then over columns in double.
template <typename scalar_t>
void backward_ghost_impl(const ElsaGeometry& g, const scalar_t* go, const scalar_t* x, const scalar_t* h,
                         bool batched, scalar_t* gm, scalar_t* ga) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = g.radius(), kk = g.kk(), plane = g.Ho * g.Wo, cpg = g.channels_per_group();
  const int64_t units = batched ? g.B * g.C : g.C;
  const int64_t rows_per_unit = (batched ? 1 : g.B) * g.Ho;
  at::parallel_for(0, units, grain_for(rows_per_unit * kk * g.Wo), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mul_buffer(gm ? kk * g.Wo : 0), add_buffer(ga ? kk * g.Wo : 0);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t c = unit % g.C;
      const int64_t b_begin = batched ? unit / g.C : 0, b_end = batched ? b_begin + 1 : g.B;
      std::fill(mul_buffer.begin(), mul_buffer.end(), acc_t(0));
      std::fill(add_buffer.begin(), add_buffer.end(), acc_t(0));
      for (int64_t b = b_begin; b < b_end; ++b) {
        const scalar_t* x_plane = x + (b * g.C + c) * g.H * g.W;
        const scalar_t* h_plane = h ? h + (b * g.G + c / cpg) * kk * plane : nullptr;
        for (int64_t i = 0; i < g.Ho; ++i) {
          const scalar_t* go_row = go + ((b * g.C + c) * g.Ho + i) * g.Wo;
          for (int64_t p = 0; p < g.K; ++p) {
            const int64_t y = i * g.stride + (p - r) * g.dilation;
            if (y < 0 || y >= g.H) continue;
            for (int64_t q = 0; q < g.K; ++q) {
              const int64_t tap = p * g.K + q, off = (q - r) * g.dilation;
              const scalar_t* x_row = x_plane + y * g.W;
              int64_t j0, j1;
              valid_columns(off, g.stride, g.W, g.Wo, j0, j1);
              if (ga)
                accumulate_product<scalar_t, acc_t>(add_buffer.data() + tap * g.Wo, go_row, x_row, nullptr, acc_t(1),
                                                    off, g.stride, j0, j1);
              if (gm)
                accumulate_product<scalar_t, acc_t>(mul_buffer.data() + tap * g.Wo, go_row, x_row,
                                                    h_plane + tap * plane + i * g.Wo, acc_t(1), off, g.stride, j0, j1);
            }
          }
        }
      }
      for (int64_t tap = 0; tap < kk; ++tap) {
        if (ga) {
          double sum = 0;
          for (int64_t j = 0; j < g.Wo; ++j) sum += add_buffer[tap * g.Wo + j];
          ga[unit * kk + tap] = static_cast<scalar_t>(sum);
        }
        if (gm) {
          double sum = 0;
          for (int64_t j = 0; j < g.Wo; ++j) sum += mul_buffer[tap * g.Wo + j];
          gm[unit * kk + tap] = static_cast<scalar_t>(sum);
        }
      }
    }
  });
}

#define ELSA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor forward_cpu(const at::Tensor& features, const at::Tensor& h_attn,
                       const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add,
                       int64_t kernel_size, int64_t dilation, int64_t stride) {
  const auto g = check_forward_args(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride);
  const auto x = features.contiguous(), h = h_attn.contiguous();
  const auto m = contiguous_or_undefined(ghost_mul), a = contiguous_or_undefined(ghost_add);
  auto out = at::empty({g.B, g.C, g.Ho, g.Wo}, x.options());
  ELSA_DISPATCH(x.scalar_type(), "elsa_forward_cpu", [&] {
    forward_impl<scalar_t>(g, x.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(m),
                           ghost_batch_stride(m, g), data_or_null<scalar_t>(a), ghost_batch_stride(a, g),
                           out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor backward_features_cpu(const at::Tensor& grad_out, const at::Tensor& h_attn,
                                 const std::optional<at::Tensor>& ghost_mul,
                                 const std::optional<at::Tensor>& ghost_add, int64_t height, int64_t width,
                                 int64_t kernel_size, int64_t dilation, int64_t stride) {
  TORCH_CHECK(grad_out.dim() == 4 && h_attn.dim() == 5, "elsa: bad grad_out/h_attn ranks");
  const auto g = make_geometry(grad_out.size(0), grad_out.size(1), height, width, h_attn.size(1), kernel_size,
                               dilation, stride);
  check_attn(h_attn, g);
  const auto go = grad_out.contiguous(), h = h_attn.contiguous();
  const auto m = contiguous_or_undefined(ghost_mul), a = contiguous_or_undefined(ghost_add);
  if (m.defined()) check_ghost(m, g, "ghost_mul");
  if (a.defined()) check_ghost(a, g, "ghost_add");
  auto gx = at::empty({g.B, g.C, g.H, g.W}, go.options());
  ELSA_DISPATCH(go.scalar_type(), "elsa_backward_features_cpu", [&] {
    backward_features_impl<scalar_t>(g, go.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                     data_or_null<scalar_t>(m), ghost_batch_stride(m, g), data_or_null<scalar_t>(a),
                                     ghost_batch_stride(a, g), gx.mutable_data_ptr<scalar_t>());
  });
  return gx;
}

at::Tensor backward_attn_cpu(const at::Tensor& grad_out, const at::Tensor& features,
                             const std::optional<at::Tensor>& ghost_mul, int64_t groups, int64_t kernel_size,
                             int64_t dilation, int64_t stride) {
  TORCH_CHECK(features.dim() == 4, "elsa: features must be [B, C, H, W], got ", features.sizes());
  const auto g = make_geometry(features.size(0), features.size(1), features.size(2), features.size(3), groups,
                               kernel_size, dilation, stride);
  check_grad_out(grad_out, features, g);
  const auto go = grad_out.contiguous(), x = features.contiguous();
  const auto m = contiguous_or_undefined(ghost_mul);
  if (m.defined()) check_ghost(m, g, "ghost_mul");
  auto gh = at::empty({g.B, g.G, g.kk(), g.Ho, g.Wo}, go.options());
  ELSA_DISPATCH(go.scalar_type(), "elsa_backward_attn_cpu", [&] {
    backward_attn_impl<scalar_t>(g, go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                 data_or_null<scalar_t>(m), ghost_batch_stride(m, g), gh.mutable_data_ptr<scalar_t>());
  });
  return gh;
}

std::tuple<at::Tensor, at::Tensor> backward_ghost_cpu(const at::Tensor& grad_out, const at::Tensor& features,
                                                      const std::optional<at::Tensor>& h_attn, int64_t groups,
                                                      int64_t kernel_size, int64_t dilation, int64_t stride,
                                                      bool batched, bool need_mul, bool need_add) {
  TORCH_CHECK(features.dim() == 4, "elsa: features must be [B, C, H, W], got ", features.sizes());
  const auto g = make_geometry(features.size(0), features.size(1), features.size(2), features.size(3), groups,
                               kernel_size, dilation, stride);
  check_grad_out(grad_out, features, g);
  TORCH_CHECK(!need_mul || h_attn.has_value(), "elsa: grad_ghost_mul needs h_attn");
  if (need_mul) check_attn(*h_attn, g);
  const auto go = grad_out.contiguous(), x = features.contiguous();
  const auto h = need_mul ? h_attn->contiguous() : at::Tensor();
  const std::vector<int64_t> shape = batched ? std::vector<int64_t>{g.B, g.C, g.K, g.K}
                                             : std::vector<int64_t>{g.C, g.K, g.K};
  auto gm = need_mul ? at::empty(shape, go.options()) : at::empty({0}, go.options());
  auto ga = need_add ? at::empty(shape, go.options()) : at::empty({0}, go.options());
  ELSA_DISPATCH(go.scalar_type(), "elsa_backward_ghost_cpu", [&] {
    backward_ghost_impl<scalar_t>(g, go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  need_mul ? h.const_data_ptr<scalar_t>() : nullptr, batched,
                                  need_mul ? gm.mutable_data_ptr<scalar_t>() : nullptr,
                                  need_add ? ga.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {gm, ga};
}

}  // namespace

TORCH_LIBRARY_IMPL(elsa_op, CPU, m) {
  m.impl("elsa_forward", &forward_cpu);
  m.impl("elsa_backward_features", &backward_features_cpu);
  m.impl("elsa_backward_attn", &backward_attn_cpu);
  m.impl("elsa_backward_ghost", &backward_ghost_cpu);
}

}  // namespace elsa_op
