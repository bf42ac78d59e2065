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
#include <cstring>
#include <vector>

#include "../elsa_common.h"
#include "nhwc_ops.h"
#include "window.h"

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

// ---- Unit stride: zero-padded planes ---------------------------------------------------------------
// With stride 1 every tap is a fixed offset into a zero-padded plane whose rows are Wp = W + 2*r*d long,
// so these kernels sweep whole planes without bounds checks: outputs are computed in the padded-width
// layout n = i * Wp + j and the columns j >= W are dropped. A block of kBlock outputs stays in registers
// while all taps are summed. Planes are converted to acc_t once, so half/bfloat16 run the float loops.
// The models only use stride 1; other strides take the row kernels above.
// 16-byte vectors through GCC/Clang vector extensions (SSE2, the x86-64 baseline; NEON on Arm), so no
// intrinsics and no -march flags are needed.
// Sums over taps stay in registers, four vectors of outputs at a time, until every tap is added.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(16)));
  static constexpr int64_t lanes = 16 / sizeof(T);
};

template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void vstore(T* p, const typename Vec<T>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

struct PaddedLayout {
  int64_t pad, Wp, L, plane;
  explicit PaddedLayout(const ElsaGeometry& g)
      : pad(g.radius() * g.dilation), Wp(g.W + 2 * pad), L(g.H * Wp),
        // the last row's dropped columns read up to 2 * pad elements past the padded plane
        plane((g.H + 2 * pad) * Wp + 2 * pad) {}
  int64_t center() const { return pad * Wp + pad; }  // where pixel (0, 0) sits
};

template <typename scalar_t, typename acc_t>
void pad_plane(const scalar_t* src, const ElsaGeometry& g, const PaddedLayout& l, acc_t* dst) {
  std::fill(dst, dst + l.plane, acc_t(0));
  for (int64_t y = 0; y < g.H; ++y) {
    acc_t* row = dst + (y + l.pad) * l.Wp + l.pad;
    for (int64_t x = 0; x < g.W; ++x) row[x] = static_cast<acc_t>(src[y * g.W + x]);
  }
}

template <typename scalar_t, typename acc_t>
void unpad_plane(const acc_t* src, const ElsaGeometry& g, const PaddedLayout& l, scalar_t* dst) {
  for (int64_t y = 0; y < g.H; ++y)
    for (int64_t x = 0; x < g.W; ++x) dst[y * g.W + x] = static_cast<scalar_t>(src[y * l.Wp + x]);
}

// dst[n] = sum_t v[v_off[t] + n] * (mul[t] * h[t * h_stride + h_off[t] + n] + add[t]) for n in [0, len).
template <typename acc_t>
void weighted_tap_sum(acc_t* __restrict__ dst, int64_t len, const acc_t* __restrict__ v, const int64_t* v_off,
                      const acc_t* __restrict__ h, int64_t h_stride, const int64_t* h_off, const acc_t* mul,
                      const acc_t* add, int64_t kk) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t N = Vec<acc_t>::lanes;
  int64_t n0 = 0;
  for (; n0 + 4 * N <= len; n0 += 4 * N) {
    V acc0{}, acc1{}, acc2{}, acc3{};
    for (int64_t t = 0; t < kk; ++t) {
      const acc_t* vv = v + v_off[t] + n0;
      const acc_t* hv = h + t * h_stride + h_off[t] + n0;
      const acc_t mu = mul[t], ad = add[t];
      acc0 += vload(vv) * (mu * vload(hv) + ad);
      acc1 += vload(vv + N) * (mu * vload(hv + N) + ad);
      acc2 += vload(vv + 2 * N) * (mu * vload(hv + 2 * N) + ad);
      acc3 += vload(vv + 3 * N) * (mu * vload(hv + 3 * N) + ad);
    }
    vstore(dst + n0, acc0);
    vstore(dst + n0 + N, acc1);
    vstore(dst + n0 + 2 * N, acc2);
    vstore(dst + n0 + 3 * N, acc3);
  }
  for (; n0 < len; ++n0) {
    acc_t acc = 0;
    for (int64_t t = 0; t < kk; ++t) acc += v[v_off[t] + n0] * (mul[t] * h[t * h_stride + h_off[t] + n0] + add[t]);
    dst[n0] = acc;
  }
}

// dst[n] += go[go_off + n] * x[x_off + n] * mul for n in [0, len).
template <typename acc_t>
void product_accumulate(acc_t* __restrict__ dst, int64_t len, const acc_t* __restrict__ go,
                        const acc_t* __restrict__ x, acc_t mul) {
  constexpr int64_t N = Vec<acc_t>::lanes;
  int64_t n0 = 0;
  for (; n0 + N <= len; n0 += N) vstore(dst + n0, vload(dst + n0) + vload(go + n0) * vload(x + n0) * mul);
  for (; n0 < len; ++n0) dst[n0] += go[n0] * x[n0] * mul;
}

// sum_n a[n] * b[n] (* w[n] when w is given), summed in vector lanes, then in double.
template <typename acc_t>
double lane_dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, const acc_t* __restrict__ w, int64_t len) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t N = Vec<acc_t>::lanes;
  V acc0{}, acc1{};
  int64_t n0 = 0;
  if (w) {
    for (; n0 + 2 * N <= len; n0 += 2 * N) {
      acc0 += vload(a + n0) * vload(b + n0) * vload(w + n0);
      acc1 += vload(a + n0 + N) * vload(b + n0 + N) * vload(w + n0 + N);
    }
  } else {
    for (; n0 + 2 * N <= len; n0 += 2 * N) {
      acc0 += vload(a + n0) * vload(b + n0);
      acc1 += vload(a + n0 + N) * vload(b + n0 + N);
    }
  }
  double sum = 0;
  for (int64_t k = 0; k < N; ++k) sum += static_cast<double>(acc0[k]) + acc1[k];
  for (; n0 < len; ++n0) sum += static_cast<double>(a[n0]) * b[n0] * (w ? w[n0] : acc_t(1));
  return sum;
}

// Offsets of each tap in a padded plane: forward reads x at (i + p*d, j + q*d) of the padded plane;
// the features gradient reads grad_out and h at (y + (2r - p)*d, x + (2r - q)*d).
inline std::vector<int64_t> tap_offsets(const ElsaGeometry& g, const PaddedLayout& l, bool flipped) {
  std::vector<int64_t> off(g.kk());
  const int64_t last = g.K - 1;
  for (int64_t p = 0; p < g.K; ++p)
    for (int64_t q = 0; q < g.K; ++q)
      off[p * g.K + q] = ((flipped ? last - p : p) * l.Wp + (flipped ? last - q : q)) * g.dilation;
  return off;
}

// The K*K ghost values of one channel, or `fallback` where there is no ghost kernel.
template <typename scalar_t, typename acc_t>
void load_ghost(const scalar_t* t, int64_t offset, acc_t fallback, std::vector<acc_t>& dst) {
  for (size_t k = 0; k < dst.size(); ++k) dst[k] = t ? static_cast<acc_t>(t[offset + k]) : fallback;
}

// Shared by forward and grad-features: per (batch, group), pad the group's K*K attention planes once,
// then per channel sweep `v` (x for forward, grad_out for grad-features) against them.
template <typename scalar_t>
void padded_weighted_impl(const ElsaGeometry& g, const scalar_t* v, const scalar_t* h, const scalar_t* m,
                          int64_t m_bstride, const scalar_t* a, int64_t a_bstride, scalar_t* out, bool flipped) {
  using acc_t = at::opmath_type<scalar_t>;
  const PaddedLayout l(g);
  const int64_t kk = g.kk(), cpg = g.channels_per_group();
  const auto v_off = tap_offsets(g, l, flipped);
  const auto h_off = flipped ? v_off : std::vector<int64_t>(kk, l.center());
  at::parallel_for(0, g.B * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> hp(kk * l.plane), vp(l.plane), acc(l.L), mul(kk), add(kk);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / g.G, grp = bg % g.G;
      for (int64_t t = 0; t < kk; ++t) pad_plane(h + (bg * kk + t) * g.H * g.W, g, l, hp.data() + t * l.plane);
      for (int64_t c = grp * cpg; c < (grp + 1) * cpg; ++c) {
        const int64_t bc = b * g.C + c;
        pad_plane(v + bc * g.H * g.W, g, l, vp.data());
        load_ghost(m, b * m_bstride + c * kk, acc_t(1), mul);
        load_ghost(a, b * a_bstride + c * kk, acc_t(0), add);
        weighted_tap_sum(acc.data(), l.L, vp.data(), v_off.data(), hp.data(), l.plane, h_off.data(), mul.data(),
                         add.data(), kk);
        unpad_plane(acc.data(), g, l, out + bc * g.H * g.W);
      }
    }
  });
}

template <typename scalar_t>
void padded_attn_impl(const ElsaGeometry& g, const scalar_t* go, const scalar_t* x, const scalar_t* m,
                      int64_t m_bstride, scalar_t* gh) {
  using acc_t = at::opmath_type<scalar_t>;
  const PaddedLayout l(g);
  const int64_t kk = g.kk(), cpg = g.channels_per_group();
  const auto x_off = tap_offsets(g, l, false);
  at::parallel_for(0, g.B * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gop(l.plane), xp(l.plane), acc(kk * l.L);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / g.G, grp = bg % g.G;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t c = grp * cpg; c < (grp + 1) * cpg; ++c) {
        pad_plane(go + (b * g.C + c) * g.H * g.W, g, l, gop.data());
        pad_plane(x + (b * g.C + c) * g.H * g.W, g, l, xp.data());
        for (int64_t t = 0; t < kk; ++t) {
          const acc_t mul = m ? static_cast<acc_t>(m[b * m_bstride + c * kk + t]) : acc_t(1);
          product_accumulate(acc.data() + t * l.L, l.L, gop.data() + l.center(), xp.data() + x_off[t], mul);
        }
      }
      for (int64_t t = 0; t < kk; ++t) unpad_plane(acc.data() + t * l.L, g, l, gh + (bg * kk + t) * g.H * g.W);
    }
  });
}

// Per (batch, group) partial sums in double, then a fixed-order sum over the batch for broadcast kernels.
template <typename scalar_t>
void padded_ghost_impl(const ElsaGeometry& g, const scalar_t* go, const scalar_t* x, const scalar_t* h,
                       bool batched, scalar_t* gm, scalar_t* ga) {
  using acc_t = at::opmath_type<scalar_t>;
  const PaddedLayout l(g);
  const int64_t kk = g.kk(), cpg = g.channels_per_group();
  const auto x_off = tap_offsets(g, l, false);
  std::vector<double> part_mul(gm ? g.B * g.C * kk : 0), part_add(ga ? g.B * g.C * kk : 0);
  at::parallel_for(0, g.B * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> hp(gm ? kk * l.plane : 0), gop(l.plane), xp(l.plane);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / g.G, grp = bg % g.G;
      if (gm)
        for (int64_t t = 0; t < kk; ++t) pad_plane(h + (bg * kk + t) * g.H * g.W, g, l, hp.data() + t * l.plane);
      for (int64_t c = grp * cpg; c < (grp + 1) * cpg; ++c) {
        const int64_t bc = b * g.C + c;
        pad_plane(go + bc * g.H * g.W, g, l, gop.data());
        pad_plane(x + bc * g.H * g.W, g, l, xp.data());
        const acc_t* go_c = gop.data() + l.center();
        for (int64_t t = 0; t < kk; ++t) {
          if (ga) part_add[bc * kk + t] = lane_dot<acc_t>(go_c, xp.data() + x_off[t], nullptr, l.L);
          if (gm)
            part_mul[bc * kk + t] =
                lane_dot<acc_t>(go_c, xp.data() + x_off[t], hp.data() + t * l.plane + l.center(), l.L);
        }
      }
    }
  });
  const int64_t per_batch = g.C * kk;
  for (auto [part, dst] : {std::pair{&part_mul, gm}, std::pair{&part_add, ga}}) {
    if (!dst) continue;
    for (int64_t k = 0; k < per_batch; ++k) {
      if (batched) {
        for (int64_t b = 0; b < g.B; ++b) dst[b * per_batch + k] = static_cast<scalar_t>((*part)[b * per_batch + k]);
      } else {
        double sum = 0;
        for (int64_t b = 0; b < g.B; ++b) sum += (*part)[b * per_batch + k];
        dst[k] = static_cast<scalar_t>(sum);
      }
    }
  }
}

#define ELSA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor forward_cpu(const at::Tensor& features, const at::Tensor& h_attn,
                       const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add,
                       int64_t kernel_size, int64_t dilation, int64_t stride) {
  const auto g = check_forward_args(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride);
  if (is_channels_last(features)) return forward_nhwc(g, features, h_attn, ghost_mul, ghost_add);
  const auto x = features.contiguous(), h = h_attn.contiguous();
  const auto m = contiguous_or_undefined(ghost_mul), a = contiguous_or_undefined(ghost_add);
  auto out = at::empty({g.B, g.C, g.Ho, g.Wo}, x.options());
  ELSA_DISPATCH(x.scalar_type(), "elsa_forward_cpu", [&] {
    if (g.stride == 1)
      padded_weighted_impl<scalar_t>(g, x.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                     data_or_null<scalar_t>(m), ghost_batch_stride(m, g), data_or_null<scalar_t>(a),
                                     ghost_batch_stride(a, g), out.mutable_data_ptr<scalar_t>(), false);
    else
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
  const auto g = check_backward_features_args(grad_out, h_attn, ghost_mul, ghost_add, height, width, kernel_size,
                                              dilation, stride);
  if (is_channels_last(grad_out)) return backward_features_nhwc(g, grad_out, h_attn, ghost_mul, ghost_add);
  const auto go = grad_out.contiguous(), h = h_attn.contiguous();
  const auto m = contiguous_or_undefined(ghost_mul), a = contiguous_or_undefined(ghost_add);
  auto gx = at::empty({g.B, g.C, g.H, g.W}, go.options());
  ELSA_DISPATCH(go.scalar_type(), "elsa_backward_features_cpu", [&] {
    if (g.stride == 1)
      padded_weighted_impl<scalar_t>(g, go.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                     data_or_null<scalar_t>(m), ghost_batch_stride(m, g), data_or_null<scalar_t>(a),
                                     ghost_batch_stride(a, g), gx.mutable_data_ptr<scalar_t>(), true);
    else
      backward_features_impl<scalar_t>(g, go.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                       data_or_null<scalar_t>(m), ghost_batch_stride(m, g), data_or_null<scalar_t>(a),
                                       ghost_batch_stride(a, g), gx.mutable_data_ptr<scalar_t>());
  });
  return gx;
}

at::Tensor backward_attn_cpu(const at::Tensor& grad_out, const at::Tensor& features,
                             const std::optional<at::Tensor>& ghost_mul, int64_t groups, int64_t kernel_size,
                             int64_t dilation, int64_t stride) {
  const auto g = check_backward_attn_args(grad_out, features, ghost_mul, groups, kernel_size, dilation, stride);
  if (is_channels_last(features)) return backward_attn_nhwc(g, grad_out, features, ghost_mul);
  const auto go = grad_out.contiguous(), x = features.contiguous();
  const auto m = contiguous_or_undefined(ghost_mul);
  auto gh = at::empty({g.B, g.G, g.kk(), g.Ho, g.Wo}, go.options());
  ELSA_DISPATCH(go.scalar_type(), "elsa_backward_attn_cpu", [&] {
    if (g.stride == 1)
      padded_attn_impl<scalar_t>(g, go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                 data_or_null<scalar_t>(m), ghost_batch_stride(m, g), gh.mutable_data_ptr<scalar_t>());
    else
      backward_attn_impl<scalar_t>(g, go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                   data_or_null<scalar_t>(m), ghost_batch_stride(m, g), gh.mutable_data_ptr<scalar_t>());
  });
  return gh;
}

std::tuple<at::Tensor, at::Tensor> backward_ghost_cpu(const at::Tensor& grad_out, const at::Tensor& features,
                                                      const std::optional<at::Tensor>& h_attn, int64_t groups,
                                                      int64_t kernel_size, int64_t dilation, int64_t stride,
                                                      bool batched, bool need_mul, bool need_add) {
  const auto g =
      check_backward_ghost_args(grad_out, features, h_attn, groups, kernel_size, dilation, stride, need_mul);
  if (is_channels_last(features)) return backward_ghost_nhwc(g, grad_out, features, h_attn, batched, need_mul, need_add);
  const auto go = grad_out.contiguous(), x = features.contiguous();
  const auto h = need_mul ? h_attn->contiguous() : at::Tensor();
  at::Tensor gm, ga;
  std::tie(gm, ga) = empty_ghost_grads(g, batched, need_mul, need_add, go.options());
  ELSA_DISPATCH(go.scalar_type(), "elsa_backward_ghost_cpu", [&] {
    auto impl = g.stride == 1 ? padded_ghost_impl<scalar_t> : backward_ghost_impl<scalar_t>;
    impl(g, go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), need_mul ? h.const_data_ptr<scalar_t>() : nullptr,
         batched, need_mul ? gm.mutable_data_ptr<scalar_t>() : nullptr,
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
