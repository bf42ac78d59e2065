// CUDA kernels of the ELSA operator.
//
// Forward, grad-features and grad-attention use one thread per output element (gathers, no atomics,
// so the results are deterministic). The ghost-kernel gradients are reductions over batch and space:
// one block per (ghost kernel, tap) with a fixed reduction order. Half and bfloat16 inputs are read
// natively and accumulated in float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../elsa_common.h"

namespace elsa_op {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20));
}

// Plain-old-data copy of the geometry for kernel arguments.
struct Geom {
  int64_t B, C, H, W, G, K, dilation, stride, Ho, Wo, cpg;
  explicit Geom(const ElsaGeometry& g)
      : B(g.B), C(g.C), H(g.H), W(g.W), G(g.G), K(g.K), dilation(g.dilation), stride(g.stride), Ho(g.Ho),
        Wo(g.Wo), cpg(g.C / g.G) {}
};

template <typename scalar_t>
__global__ void forward_kernel(Geom g, const scalar_t* __restrict__ x, const scalar_t* __restrict__ h,
                               const scalar_t* __restrict__ m, int64_t m_bstride, const scalar_t* __restrict__ a,
                               int64_t a_bstride, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = g.B * g.C * g.Ho * g.Wo, r = g.K / 2, kk = g.K * g.K, plane = g.Ho * g.Wo;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % g.Wo, i = (idx / g.Wo) % g.Ho, bc = idx / plane, c = bc % g.C, b = bc / g.C;
    const scalar_t* x_plane = x + bc * g.H * g.W;
    const scalar_t* h_pix = h + (b * g.G + c / g.cpg) * kk * plane + i * g.Wo + j;
    const scalar_t* m_c = m ? m + b * m_bstride + c * kk : nullptr;
    const scalar_t* a_c = a ? a + b * a_bstride + c * kk : nullptr;
    acc_t acc = 0;
    for (int64_t p = 0; p < g.K; ++p) {
      const int64_t y = i * g.stride + (p - r) * g.dilation;
      if (y < 0 || y >= g.H) continue;
      for (int64_t q = 0; q < g.K; ++q) {
        const int64_t xx = j * g.stride + (q - r) * g.dilation;
        if (xx < 0 || xx >= g.W) continue;
        const int64_t tap = p * g.K + q;
        const acc_t mul = m_c ? static_cast<acc_t>(m_c[tap]) : acc_t(1);
        const acc_t add = a_c ? static_cast<acc_t>(a_c[tap]) : acc_t(0);
        acc += static_cast<acc_t>(x_plane[y * g.W + xx]) * (mul * static_cast<acc_t>(h_pix[tap * plane]) + add);
      }
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void backward_features_kernel(Geom g, const scalar_t* __restrict__ go, const scalar_t* __restrict__ h,
                                         const scalar_t* __restrict__ m, int64_t m_bstride,
                                         const scalar_t* __restrict__ a, int64_t a_bstride,
                                         scalar_t* __restrict__ gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = g.B * g.C * g.H * g.W, r = g.K / 2, kk = g.K * g.K, plane = g.Ho * g.Wo;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t xx = idx % g.W, y = (idx / g.W) % g.H, bc = idx / (g.H * g.W), c = bc % g.C, b = bc / g.C;
    const scalar_t* go_plane = go + bc * plane;
    const scalar_t* h_plane = h + (b * g.G + c / g.cpg) * kk * plane;
    const scalar_t* m_c = m ? m + b * m_bstride + c * kk : nullptr;
    const scalar_t* a_c = a ? a + b * a_bstride + c * kk : nullptr;
    acc_t acc = 0;
    for (int64_t p = 0; p < g.K; ++p) {
      const int64_t ti = y - (p - r) * g.dilation;
      if (ti < 0 || ti % g.stride != 0) continue;
      const int64_t i = ti / g.stride;
      if (i >= g.Ho) continue;
      for (int64_t q = 0; q < g.K; ++q) {
        const int64_t tj = xx - (q - r) * g.dilation;
        if (tj < 0 || tj % g.stride != 0) continue;
        const int64_t j = tj / g.stride;
        if (j >= g.Wo) continue;
        const int64_t tap = p * g.K + q;
        const acc_t mul = m_c ? static_cast<acc_t>(m_c[tap]) : acc_t(1);
        const acc_t add = a_c ? static_cast<acc_t>(a_c[tap]) : acc_t(0);
        acc += static_cast<acc_t>(go_plane[i * g.Wo + j]) *
               (mul * static_cast<acc_t>(h_plane[tap * plane + i * g.Wo + j]) + add);
      }
    }
    gx[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void backward_attn_kernel(Geom g, const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ m, int64_t m_bstride, scalar_t* __restrict__ gh) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kk = g.K * g.K, plane = g.Ho * g.Wo, r = g.K / 2;
  const int64_t n = g.B * g.G * kk * plane;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % g.Wo, i = (idx / g.Wo) % g.Ho, tap = (idx / plane) % kk, bg = idx / (kk * plane);
    const int64_t grp = bg % g.G, b = bg / g.G, p = tap / g.K, q = tap % g.K;
    const int64_t y = i * g.stride + (p - r) * g.dilation, xx = j * g.stride + (q - r) * g.dilation;
    acc_t acc = 0;
    if (y >= 0 && y < g.H && xx >= 0 && xx < g.W) {
      for (int64_t c = grp * g.cpg; c < (grp + 1) * g.cpg; ++c) {
        const int64_t bc = b * g.C + c;
        const acc_t mul = m ? static_cast<acc_t>(m[b * m_bstride + c * kk + tap]) : acc_t(1);
        acc += static_cast<acc_t>(go[bc * plane + i * g.Wo + j]) *
               static_cast<acc_t>(x[(bc * g.H + y) * g.W + xx]) * mul;
      }
    }
    gh[idx] = static_cast<scalar_t>(acc);
  }
}

// Fixed-order block reduction of two values; returns the sums in thread 0.
template <typename acc_t>
__device__ void block_sum2(acc_t& u, acc_t& v) {
  __shared__ acc_t su[kThreads / 32], sv[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    u += __shfl_down_sync(0xffffffff, u, offset);
    v += __shfl_down_sync(0xffffffff, v, offset);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    su[warp] = u;
    sv[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    u = lane < kThreads / 32 ? su[lane] : acc_t(0);
    v = lane < kThreads / 32 ? sv[lane] : acc_t(0);
    for (int offset = 16; offset > 0; offset /= 2) {
      u += __shfl_down_sync(0xffffffff, u, offset);
      v += __shfl_down_sync(0xffffffff, v, offset);
    }
  }
}

// One block per (ghost kernel, tap): grid = (units * K*K), units = C, or B*C when batched.
template <typename scalar_t>
__global__ void backward_ghost_kernel(Geom g, const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ h, bool batched, scalar_t* __restrict__ gm,
                                      scalar_t* __restrict__ ga) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kk = g.K * g.K, plane = g.Ho * g.Wo, r = g.K / 2;
  const int64_t unit = blockIdx.x / kk, tap = blockIdx.x % kk, p = tap / g.K, q = tap % g.K;
  const int64_t c = unit % g.C, b0 = batched ? unit / g.C : 0, nb = batched ? 1 : g.B;
  acc_t sum_mul = 0, sum_add = 0;
  for (int64_t e = threadIdx.x; e < nb * plane; e += blockDim.x) {
    const int64_t b = b0 + e / plane, i = (e % plane) / g.Wo, j = e % g.Wo;
    const int64_t y = i * g.stride + (p - r) * g.dilation, xx = j * g.stride + (q - r) * g.dilation;
    if (y < 0 || y >= g.H || xx < 0 || xx >= g.W) continue;
    const int64_t bc = b * g.C + c;
    const acc_t t = static_cast<acc_t>(go[bc * plane + i * g.Wo + j]) * static_cast<acc_t>(x[(bc * g.H + y) * g.W + xx]);
    sum_add += t;
    if (gm) sum_mul += t * static_cast<acc_t>(h[((b * g.G + c / g.cpg) * kk + tap) * plane + i * g.Wo + j]);
  }
  block_sum2(sum_mul, sum_add);
  if (threadIdx.x == 0) {
    if (gm) gm[unit * kk + tap] = static_cast<scalar_t>(sum_mul);
    if (ga) ga[unit * kk + tap] = static_cast<scalar_t>(sum_add);
  }
}

#define ELSA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor forward_cuda(const at::Tensor& features, const at::Tensor& h_attn,
                        const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add,
                        int64_t kernel_size, int64_t dilation, int64_t stride) {
  const auto g = check_forward_args(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride);
  const c10::cuda::CUDAGuard guard(features.device());
  const auto x = features.contiguous(), h = h_attn.contiguous();
  const auto m = contiguous_or_undefined(ghost_mul), a = contiguous_or_undefined(ghost_add);
  auto out = at::empty({g.B, g.C, g.Ho, g.Wo}, x.options());
  const int64_t n = out.numel();
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) ELSA_DISPATCH(x.scalar_type(), "elsa_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        Geom(g), x.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(m),
        ghost_batch_stride(m, g), data_or_null<scalar_t>(a), ghost_batch_stride(a, g), out.mutable_data_ptr<scalar_t>());
  });
  AT_CUDA_CHECK(cudaGetLastError());
  // The kernels compute in NCHW; results take the layout that the CPU kernels and fake kernels give.
  return is_channels_last(features) ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
}

at::Tensor backward_features_cuda(const at::Tensor& grad_out, const at::Tensor& h_attn,
                                  const std::optional<at::Tensor>& ghost_mul,
                                  const std::optional<at::Tensor>& ghost_add, int64_t height, int64_t width,
                                  int64_t kernel_size, int64_t dilation, int64_t stride) {
  const auto g = check_backward_features_args(grad_out, h_attn, ghost_mul, ghost_add, height, width, kernel_size,
                                              dilation, stride);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto go = grad_out.contiguous(), h = h_attn.contiguous();
  const auto m = contiguous_or_undefined(ghost_mul), a = contiguous_or_undefined(ghost_add);
  auto gx = at::empty({g.B, g.C, g.H, g.W}, go.options());
  const int64_t n = gx.numel();
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) ELSA_DISPATCH(go.scalar_type(), "elsa_backward_features_cuda", [&] {
    backward_features_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        Geom(g), go.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(m),
        ghost_batch_stride(m, g), data_or_null<scalar_t>(a), ghost_batch_stride(a, g), gx.mutable_data_ptr<scalar_t>());
  });
  AT_CUDA_CHECK(cudaGetLastError());
  return is_channels_last(grad_out) ? gx.contiguous(at::MemoryFormat::ChannelsLast) : gx;
}

at::Tensor backward_attn_cuda(const at::Tensor& grad_out, const at::Tensor& features,
                              const std::optional<at::Tensor>& ghost_mul, int64_t groups, int64_t kernel_size,
                              int64_t dilation, int64_t stride) {
  const auto g = check_backward_attn_args(grad_out, features, ghost_mul, groups, kernel_size, dilation, stride);
  const c10::cuda::CUDAGuard guard(features.device());
  const auto go = grad_out.contiguous(), x = features.contiguous();
  const auto m = contiguous_or_undefined(ghost_mul);
  auto gh = at::empty({g.B, g.G, g.kk(), g.Ho, g.Wo}, go.options());
  const int64_t n = gh.numel();
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) ELSA_DISPATCH(go.scalar_type(), "elsa_backward_attn_cuda", [&] {
    backward_attn_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        Geom(g), go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(m),
        ghost_batch_stride(m, g), gh.mutable_data_ptr<scalar_t>());
  });
  AT_CUDA_CHECK(cudaGetLastError());
  return is_channels_last(features) ? attn_channels_last(gh) : gh;
}

std::tuple<at::Tensor, at::Tensor> backward_ghost_cuda(const at::Tensor& grad_out, const at::Tensor& features,
                                                      const std::optional<at::Tensor>& h_attn, int64_t groups,
                                                      int64_t kernel_size, int64_t dilation, int64_t stride,
                                                      bool batched, bool need_mul, bool need_add) {
  const auto g =
      check_backward_ghost_args(grad_out, features, h_attn, groups, kernel_size, dilation, stride, need_mul);
  const c10::cuda::CUDAGuard guard(features.device());
  const auto go = grad_out.contiguous(), x = features.contiguous();
  const auto h = need_mul ? h_attn->contiguous() : at::Tensor();
  at::Tensor gm, ga;
  std::tie(gm, ga) = empty_ghost_grads(g, batched, need_mul, need_add, go.options());
  const int64_t blocks = (batched ? g.B * g.C : g.C) * g.kk();
  // (An empty batch still launches for broadcast kernels: each block writes its sum of nothing, 0.)
  if ((!need_mul && !need_add) || blocks == 0) return {gm, ga};
  TORCH_CHECK(blocks < (int64_t(1) << 31), "elsa: too many ghost kernels for one launch");
  const auto stream = at::cuda::getCurrentCUDAStream();
  ELSA_DISPATCH(go.scalar_type(), "elsa_backward_ghost_cuda", [&] {
    backward_ghost_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        Geom(g), go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        need_mul ? h.const_data_ptr<scalar_t>() : nullptr, batched,
        need_mul ? gm.mutable_data_ptr<scalar_t>() : nullptr, need_add ? ga.mutable_data_ptr<scalar_t>() : nullptr);
  });
  AT_CUDA_CHECK(cudaGetLastError());
  return {gm, ga};
}

}  // namespace

TORCH_LIBRARY_IMPL(elsa_op, CUDA, m) {
  m.impl("elsa_forward", &forward_cuda);
  m.impl("elsa_backward_features", &backward_features_cuda);
  m.impl("elsa_backward_attn", &backward_attn_cuda);
  m.impl("elsa_backward_ghost", &backward_ghost_cuda);
}

}  // namespace elsa_op
