// Bodies of the CUDA kernels of the ELSA operator, written once for two compilers.
//
// nvcc compiles them into the kernels of register.cu; a host C++ compiler compiles the very same
// functions into the emulation that tests/test_cuda_emulation.py runs on CPU over the full launch grid,
// so that CI, which has no GPU, still checks the kernels' index arithmetic. Everything here therefore
// sticks to what both compilers accept: no intrinsics, no warp shuffles, and every block-wide step goes
// through the `Block` interface (its CUDA version maps it to threadIdx and __syncthreads, the emulation
// runs the threads of a block one after the other between two barriers).
//
// Layout (channels-last, as the models keep their tensors):
//   features, grad_features, out, grad_out  [B, H, W, C]: unit channel stride, any pixel strides
//   attention and its gradient              [B, Ho, Wo, G, K*K]: unit tap stride, any other strides
//   ghost kernels                           [U, K*K, C] tables in the accumulation type (U = 1 or B), tap-major:
//                                           the lanes of a warp read one tap's values from neighbouring bytes
// Each thread owns V consecutive channels (one 16-byte vector) for a run of neighbouring pixels of a row (in
// the attention/ghost pass, for each of its (channel vector, tap) pairs), so that a run shares its bounds
// checks and address work, loads and stores along channels are vectorised and coalesced, and a pixel's
// attention weight for a tap is loaded once and shared by the thread's V channels (and, through one
// broadcast transaction, by its warp's other lanes of the same head).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../geometry.h"

#ifdef __CUDACC__
#define ELSA_HD __host__ __device__ __forceinline__
#define ELSA_UNROLL _Pragma("unroll")
#define ELSA_NO_UNROLL _Pragma("unroll 1")
#define ELSA_UNROLL_TWICE _Pragma("unroll 2")
#else
#define ELSA_UNROLL_TWICE
#define ELSA_HD inline
#define ELSA_UNROLL
#define ELSA_NO_UNROLL
#endif

#include "access.h"

namespace elsa_op::gpu {

// Accumulation type: float for float, half and bfloat16; double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

// a * b + c, rounded once: one FFMA on the GPU whatever the compiler's contraction choices.
ELSA_HD float fused_multiply_add(float a, float b, float c) {
  return fmaf(a, b, c);
}
ELSA_HD double fused_multiply_add(double a, double b, double c) {
  return fma(a, b, c);
}

// V elements that load and store as one aligned vector (16 bytes when V * sizeof(T) == 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

ELSA_HD float float_of_bits(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// Vector accesses (see access.h for the checks the emulation makes; none on the GPU).
template <typename T, int V>
ELSA_HD void load_vec(Global<const T> p, acc_of<T> (&out)[V]) {
  check_access(p, V, int(sizeof(Vec<T, V>)), "vector load");
  if constexpr (std::is_same_v<T, c10::BFloat16> && V % 2 == 0) {
    // A bfloat16 is the upper half of a float32. Read as 32-bit words, the low element is one shift away
    // and the high one a mask; converted one by one, the high element is first moved down, then up again.
#ifdef __CUDA_ARCH__
    const Vec<uint32_t, V / 2> words = *reinterpret_cast<const Vec<uint32_t, V / 2>*>(raw(p));
#else
    Vec<uint32_t, V / 2> words;  // (the host compiler may assume that a uint32_t never aliases a bfloat16)
    std::memcpy(&words, raw(p), sizeof words);
#endif
    ELSA_UNROLL
    for (int e = 0; e < V / 2; ++e) {
      out[2 * e] = float_of_bits(words.v[e] << 16);
      out[2 * e + 1] = float_of_bits(words.v[e] & 0xffff0000u);
    }
  } else {
    const Vec<T, V> bits = *reinterpret_cast<const Vec<T, V>*>(raw(p));
    ELSA_UNROLL
    for (int e = 0; e < V; ++e) out[e] = static_cast<acc_of<T>>(bits.v[e]);
  }
}

// Ghost tables are in the accumulation type already.
template <typename A, int V>
ELSA_HD void load_acc(Global<const A> p, A (&out)[V]) {
  check_access(p, V, int(sizeof(Vec<A, V>)), "vector load");
  const Vec<A, V> bits = *reinterpret_cast<const Vec<A, V>*>(raw(p));
  ELSA_UNROLL
  for (int e = 0; e < V; ++e) out[e] = bits.v[e];
}

template <typename T, int V>
ELSA_HD void store_vec(Global<T> p, const acc_of<T> (&in)[V]) {
  check_access(p, V, int(sizeof(Vec<T, V>)), "vector store");
  Vec<T, V> bits;
  ELSA_UNROLL
  for (int e = 0; e < V; ++e) bits.v[e] = static_cast<T>(in[e]);
  *reinterpret_cast<Vec<T, V>*>(raw(p)) = bits;
}

// The kernels take the call's Geometry (geometry.h) in 32-bit integers: the launcher checks that every
// in-plane coordinate they form, from -(K/2)*dilation to max(H, W) + (K/2)*dilation + stride, fits.
// Offsets into tensors are 64-bit. Pixel strides are geometry.h's PixelStrides, in elements (the channel
// stride is 1); the attention's are these (its tap stride is 1):
struct AttentionStrides {
  int64_t batch, row, column, group;
};

// K as a compile-time constant where the launcher instantiated one (KT > 0), else the runtime value.
template <int KT>
ELSA_HD int kernel_size(const Geometry<int>& g) {
  return KT > 0 ? KT : g.K;
}

// ---------------------------------------------------------------------------------------------------
// Forward and grad-features are one weighted gather run in opposite directions: from the features to the
// output grid (forward_item), or from grad_out back to the features' grid (features_item). A thread owns
// its channel vector for a run of kRunPixels neighbouring pixels of one row of the grid it writes, so that
// the ghost-table loads of a tap, the tap's address offsets and the bounds checks are made once for the
// whole run. Grid: x over the (run, channel vector) items of a row, channel vectors fastest (coalesced),
// y over its B * rows rows (strided).
constexpr int kRunPixels = 4;

template <typename T>
struct GatherArgs {
  Geometry<int> geometry;
  // Derived once by the launcher, so that no kernel divides for them.
  int channels_per_group;
  int channel_vectors;      // per pixel: C / V
  int dilation_div_stride;  // dilation / stride and dilation % stride: the grad-features gather steps
  int dilation_mod_stride;  // through the output grid with these instead of dividing in its inner loop
  // Whether the offsets along a window row and from a run's first pixel to its others, in the source and
  // the attention, and along a row of the ghost tables fit 32 bits: the inside-the-image paths, which form
  // their addresses from them, may then be taken.
  bool narrow_offsets;
  Global<const T> source;  // the features (forward) or grad_out (grad features)
  PixelStrides source_strides;
  Global<const T> attention;
  AttentionStrides attention_strides;
  Global<const acc_of<T>> ghost_mul;  // [U, K*K, C] (tap-major: a warp's lanes read neighbouring bytes)
  int64_t ghost_mul_batch_stride;     // batch stride of the table: 0 when broadcast
  Global<const acc_of<T>> ghost_add;  // the same layout
  int64_t ghost_add_batch_stride;
  Global<T> destination;  // the output (forward) or grad_features
  PixelStrides destination_strides;
};

// Runs of pixels per row of the grid written, times the channel vectors: the x extent of a gather's grid.
template <typename T>
ELSA_HD int64_t gather_items_per_row(const GatherArgs<T>& A, bool grad_features) {
  const int cols = grad_features ? A.geometry.W : A.geometry.Wo;
  return int64_t((cols + kRunPixels - 1) / kRunPixels) * A.channel_vectors;
}

// The ghost kernels' values of one tap for the thread's channels (`at`: the tap's offset in the tables).
// Whether each table is present is a compile-time choice of the launcher, so an absent one costs nothing.
template <bool kMul, bool kAdd, typename A, int V>
ELSA_HD void load_ghosts(Global<const A> m, Global<const A> a, int64_t at, A (&mv)[V], A (&av)[V]) {
  if constexpr (kMul) load_acc<A, V>(m + at, mv);
  if constexpr (kAdd) load_acc<A, V>(a + at, av);
}

// acc += v * (m * w + a) over the thread's V channels: with both ghost kernels, one FFMA for the weight and
// one for the accumulation; an absent ghost kernel drops its term.
template <bool kMul, bool kAdd, typename A, int V>
ELSA_HD void weighted_accumulate(A (&acc)[V], const A (&v)[V], A w, const A (&mv)[V], const A (&av)[V]) {
  ELSA_UNROLL
  for (int e = 0; e < V; ++e) {
    A coef = w;
    if constexpr (kMul && kAdd) {
      coef = mv[e] * w + av[e];
    } else if constexpr (kMul) {
      coef = mv[e] * w;
    } else if constexpr (kAdd) {
      coef = w + av[e];
    }
    acc[e] += v[e] * coef;
  }
}

// One tap for a run of P pixels: the tap's ghost values are loaded once and serve the whole run; pixel u
// reads its vector at src + src_offset[u] and its attention weight at h + h_offset[u].
template <typename T, int V, int P, bool kMul, bool kAdd>
ELSA_HD void run_tap(acc_of<T> (&acc)[P][V], Global<const T> src, const int (&src_offset)[P], Global<const T> h,
                     const int (&h_offset)[P], Global<const acc_of<T>> m, Global<const acc_of<T>> a, int64_t at) {
  using acc_t = acc_of<T>;
  acc_t mv[V], av[V];
  load_ghosts<kMul, kAdd>(m, a, at, mv, av);
  ELSA_UNROLL
  for (int u = 0; u < P; ++u) {
    acc_t v[V];
    load_vec<T, V>(src + src_offset[u], v);
    weighted_accumulate<kMul, kAdd>(acc[u], v, static_cast<acc_t>(load(h + h_offset[u])), mv, av);
  }
}

// Whether the gathers' inside-the-image paths may take shared_row: with K a compile-time constant up to 7 (a
// longer unrolled row hoists more loads than the registers hold, and spills), else they take run_tap.
template <int KT>
constexpr bool kSharedColumns = KT > 1 && KT <= 7;

// How many of a run's pixels share columns at a time: all 4 for 32-bit types and wider; 2 for 16-bit ones
// (shared_parts), whose vectors hold twice the channels, so that their columns and sums fit the registers.
// (32-bit types sum the run in the caller's accumulators, not through shared_parts with one part: ptxas
// allocates that form worse, 3.3 instead of 3.1 instructions per channel and tap in grad features on sm_90,
// and it spills on sm_80.)
template <typename T>
constexpr int kSharedPixels = sizeof(T) >= 4 ? kRunPixels : kRunPixels / 2;

// One window row for a run of P pixels whose taps step by whole pixels, so that neighbouring pixels share
// vectors. Counting columns of the row from 0, pixel u's tap q reads column lo(q) + u, where lo(q) = q (the
// forward with stride = dilation) or K - 1 - q (grad features with stride and dilation 1; kMirror). The row's
// P * K taps then read P + K - 1 vectors, each loaded and converted once, where run_tap would load P * K.
//   - `first` is pixel 0's vector at tap 0, and each pixel's is `step` from the last; each tap brings one
//     fresh column, one step past the last one loaded.
//   - The attention weight of pixel u's tap q is at h + q, with h = `h0` + u * `h_step` for the pixel (the
//     forward), or for kMirror the same pointer for the pixel's column: output column lo(q) + u, whose
//     weights start at h0 + (lo(q) + u - (K - 1)) * h_step.
//   - m and a advance one tap (tap_stride) per tap: they end at the next row's taps.
// Every address is one step from one before it, not a product carried through the loop: such products
// would take registers across the whole row loop, where the unrolled row needs them. Taps go in order, so
// each pixel's sum is formed in run_tap's order. K is a compile-time constant: the columns are registers.
template <typename T, int K, int V, int P, bool kMul, bool kAdd, bool kMirror>
ELSA_HD void shared_row(acc_of<T> (&acc)[P][V], Global<const T> first, int step, Global<const T> h0, int h_step,
                        Global<const acc_of<T>>& m, Global<const acc_of<T>>& a, int tap_stride) {
  using acc_t = acc_of<T>;
  constexpr int N = P + K - 1;
  acc_t v[N][V];
  Global<const T> h[N];  // the weights' pointer of each pixel (forward) or column (kMirror)
  Global<const T> edge = first, h_edge = h0;
  ELSA_UNROLL
  for (int q = 0; q < K; ++q) {
    const int lo = kMirror ? K - 1 - q : q;
    if (q == 0) {
      ELSA_UNROLL
      for (int u = 0; u < P; ++u) {
        if (u > 0) {
          edge += step;
          h_edge += h_step;
        }
        load_vec<T, V>(edge, v[lo + u]);
        h[kMirror ? lo + u : u] = h_edge;
      }
      if constexpr (kMirror) {
        edge = first;
        h_edge = h0;
      }
    } else if constexpr (kMirror) {
      edge -= step;
      h_edge -= h_step;
      load_vec<T, V>(edge, v[lo]);
      h[lo] = h_edge;
    } else {
      edge += step;
      load_vec<T, V>(edge, v[lo + P - 1]);
    }
    acc_t mv[V], av[V];
    load_ghosts<kMul, kAdd>(m, a, 0, mv, av);
    if constexpr (kMul) m += tap_stride;
    if constexpr (kAdd) a += tap_stride;
    ELSA_UNROLL
    for (int u = 0; u < P; ++u) {
      const acc_t w = static_cast<acc_t>(load(h[kMirror ? lo + u : u] + q));
      weighted_accumulate<kMul, kAdd>(acc[u], v[lo + u], w, mv, av);
    }
  }
}

// The run's P pixels S at a time (S < P), each part through the K window rows with shared_row and stored
// when summed, so that only one part's sums take registers. `first`, `step`, `h0` and `h_step` are
// shared_row's for the run's pixel 0 in the first window row, `row_step` and `h_row_step` go from one window
// row to the next, m and a are the first row's ghost tables, and `store(u, sums)` stores pixel u.
template <typename T, int K, int V, int P, int S, bool kMul, bool kAdd, bool kMirror, class Store>
ELSA_HD void shared_parts(Global<const T> first, int step, int64_t row_step, Global<const T> h0, int h_step,
                          int64_t h_row_step, Global<const acc_of<T>> m, Global<const acc_of<T>> a, int tap_stride,
                          const Store& store) {
  using acc_t = acc_of<T>;
  ELSA_NO_UNROLL
  for (int u0 = 0; u0 < P; u0 += S) {
    acc_t acc[S][V];
    ELSA_UNROLL
    for (int u = 0; u < S; ++u) {
      ELSA_UNROLL
      for (int e = 0; e < V; ++e) acc[u][e] = 0;
    }
    Global<const T> src = first + u0 * step, h = h0 + u0 * h_step;
    Global<const acc_t> mr = m, ar = a;
    ELSA_NO_UNROLL
    for (int p = 0; p < K; ++p, src += row_step, h += h_row_step) {
      shared_row<T, K, V, S, kMul, kAdd, kMirror>(acc, src, step, h, h_step, mr, ar, tap_stride);
    }
    ELSA_UNROLL
    for (int u = 0; u < S; ++u) store(u0 + u, acc[u]);
  }
}

// One tap of one pixel, loading everything it needs (the border paths).
template <typename T, int V, bool kMul, bool kAdd>
ELSA_HD void weighted_tap(acc_of<T> (&acc)[V], Global<const T> v, acc_of<T> w, Global<const acc_of<T>> m,
                          Global<const acc_of<T>> a, int64_t at) {
  using acc_t = acc_of<T>;
  acc_t vv[V], mv[V], av[V];
  load_vec<T, V>(v, vv);
  load_ghosts<kMul, kAdd>(m, a, at, mv, av);
  weighted_accumulate<kMul, kAdd>(acc, vv, w, mv, av);
}

// Forward: out[b, i, j, c] = sum_t x[b, i*s + dy_t, j*s + dx_t, c] * (m[t, c] * h[b, i, j, g(c), t] + a[t, c]).
template <typename T, int KT, int V, bool kMul, bool kAdd>
ELSA_HD void forward_item(const GatherArgs<T>& A, int row, int item) {
  using acc_t = acc_of<T>;
  constexpr int P = kRunPixels;
  const Geometry<int>& g = A.geometry;
  if (item >= gather_items_per_row(A, false)) return;
  const int K = kernel_size<KT>(g), r = K / 2;
  const int b = row / g.Ho, i = row - b * g.Ho;
  const int run = item / A.channel_vectors, cv = item - run * A.channel_vectors, c = cv * V;
  const int j0 = run * P, n = g.Wo - j0 < P ? g.Wo - j0 : P;  // the run's first pixel and its length
  const int grp = c / A.channels_per_group;
  const Global<const T> xb = A.source + b * A.source_strides.batch + c;
  const Global<const T> hp = A.attention + b * A.attention_strides.batch + i * A.attention_strides.row +
                             j0 * A.attention_strides.column + grp * A.attention_strides.group;
  Global<const acc_t> mp = nullptr, ap = nullptr;
  if constexpr (kMul) mp = A.ghost_mul + b * A.ghost_mul_batch_stride + c;
  if constexpr (kAdd) ap = A.ghost_add + b * A.ghost_add_batch_stride + c;
  const Global<T> out = A.destination + b * A.destination_strides.batch + i * A.destination_strides.row +
                        j0 * A.destination_strides.column + c;
  const int y0 = i * g.stride - r * g.dilation, x0 = j0 * g.stride - r * g.dilation;
  const int span = (K - 1) * g.dilation;
  if (n == P && A.narrow_offsets && y0 >= 0 && y0 + span < g.H && x0 >= 0 && x0 + (P - 1) * g.stride + span < g.W) {
    // Every window of the run inside the image (most runs): no bounds to check. Rows one after the other;
    // a tap's addresses are 32-bit offsets from the row's pointers (each a function of the tap alone, so
    // that nothing but the tap index is carried from tap to tap), each of the run's pixels a fixed 32-bit
    // offset from those, and a tap's ghost values serve the whole run.
    acc_t acc[P][V];
    ELSA_UNROLL
    for (int u = 0; u < P; ++u) {
      ELSA_UNROLL
      for (int e = 0; e < V; ++e) acc[u][e] = 0;
    }
    int xo[P], ho[P];
    ELSA_UNROLL
    for (int u = 0; u < P; ++u) {
      xo[u] = u * g.stride * int(A.source_strides.column);
      ho[u] = u * int(A.attention_strides.column);
    }
    Global<const T> xrow = xb + y0 * A.source_strides.row + x0 * A.source_strides.column, hrow = hp;
    const int dx = g.dilation * int(A.source_strides.column);
    const int64_t dy = int64_t(g.dilation) * A.source_strides.row, ghost_row = int64_t(K) * g.C;
    bool shared = false;
    if constexpr (kSharedColumns<KT>) shared = g.stride == g.dilation;
    if constexpr (kSharedPixels<T> < P) {
      if (shared) {
        shared_parts<T, (KT > 1 ? KT : 2), V, P, kSharedPixels<T>, kMul, kAdd, false>(
            xrow, dx, dy, hrow, int(A.attention_strides.column), K, mp, ap, g.C,
            [&](int u, const acc_t(&sums)[V]) { store_vec<T, V>(out + u * A.destination_strides.column, sums); });
        return;
      }
    }
    if (shared) {
      // Pixel u's tap q reads column q + u (in steps of dx): the pixels share their vectors.
      const int hcol = int(A.attention_strides.column);
      ELSA_NO_UNROLL
      for (int p = 0; p < K; ++p, xrow += dy, hrow += K) {
        shared_row<T, (KT > 1 ? KT : 2), V, P, kMul, kAdd, false>(acc, xrow, dx, hrow, hcol, mp, ap, g.C);
      }
    } else {
      ELSA_NO_UNROLL
      for (int p = 0; p < K; ++p, xrow += dy, hrow += K) {
        // Two taps per trip: fewer loop steps and address bases. (Unrolled whole, the run's loads of a row
        // would be hoisted into spilled registers.)
        ELSA_UNROLL_TWICE
        for (int q = 0; q < K; ++q) {
          run_tap<T, V, P, kMul, kAdd>(acc, xrow + q * dx, xo, hrow + q, ho, mp, ap, q * g.C);
        }
        if constexpr (kMul) mp += ghost_row;
        if constexpr (kAdd) ap += ghost_row;
      }
    }
    ELSA_UNROLL
    for (int u = 0; u < P; ++u) store_vec<T, V>(out + u * A.destination_strides.column, acc[u]);
  } else {
    // Pixel by pixel, each stored as soon as it is summed (a run's accumulators indexed by a loop counter
    // would live in local memory).
    for (int u = 0; u < n; ++u) {
      acc_t acc[V];
      ELSA_UNROLL
      for (int e = 0; e < V; ++e) acc[e] = 0;
      const Global<const T> h = hp + u * A.attention_strides.column;
      int y = y0;
      ELSA_NO_UNROLL
      for (int p = 0; p < K; ++p, y += g.dilation) {
        if (y < 0 || y >= g.H) continue;
        const Global<const T> xrow = xb + y * A.source_strides.row;
        int xx = x0 + u * g.stride;
        for (int q = 0; q < K; ++q, xx += g.dilation) {
          if (xx < 0 || xx >= g.W) continue;
          const int t = p * K + q;
          weighted_tap<T, V, kMul, kAdd>(acc, xrow + xx * A.source_strides.column, static_cast<acc_t>(load(h + t)), mp,
                                         ap, int64_t(t) * g.C);
        }
      }
      store_vec<T, V>(out + u * A.destination_strides.column, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Gradient of the features, gathered per input pixel (no atomics): gx[b, y, x, c] is the sum over the
// output pixels (i, j) and taps t with i*s + dy_t = y and j*s + dx_t = x. Walking the taps backwards
// from tap 0, the output row i*s = y + (K/2 - p) * dilation steps down by `dilation`, which is
// d_div_s rows plus d_mod_s in the remainder: a carried remainder replaces division in the loops.
template <typename T, int KT, int V, bool kMul, bool kAdd>
ELSA_HD void features_item(const GatherArgs<T>& A, int row, int item) {
  using acc_t = acc_of<T>;
  constexpr int P = kRunPixels;
  const Geometry<int>& g = A.geometry;
  if (item >= gather_items_per_row(A, true)) return;
  const int K = kernel_size<KT>(g), r = K / 2, s = g.stride;
  const int b = row / g.H, y = row - b * g.H;
  const int run = item / A.channel_vectors, cv = item - run * A.channel_vectors, c = cv * V;
  const int x0 = run * P, n = g.W - x0 < P ? g.W - x0 : P;  // the run's first pixel and its length
  const int grp = c / A.channels_per_group;
  const Global<const T> gob = A.source + b * A.source_strides.batch + c;
  const Global<const T> hb = A.attention + b * A.attention_strides.batch + grp * A.attention_strides.group;
  Global<const acc_t> mp = nullptr, ap = nullptr;
  if constexpr (kMul) mp = A.ghost_mul + b * A.ghost_mul_batch_stride + c;
  if constexpr (kAdd) ap = A.ghost_add + b * A.ghost_add_batch_stride + c;
  const Global<T> out = A.destination + b * A.destination_strides.batch + y * A.destination_strides.row +
                        x0 * A.destination_strides.column + c;
  // Tap p = 0 reaches input row y from output row (y + r*d) / s; both numerators are >= 0 here.
  const int ty = y + r * g.dilation, tx = x0 + r * g.dilation;
  const int span = (K - 1) * g.dilation;
  if (s == 1 && n == P && A.narrow_offsets && ty < g.Ho && ty - span >= 0 && tx + P - 1 < g.Wo && tx - span >= 0) {
    // Stride 1 with every tap's output pixel inside the output for the whole run (most runs): no remainders,
    // no bounds. As in forward_item: rows one after the other, a tap's addresses 32-bit offsets from the
    // row's pointers, each pixel of the run a fixed 32-bit offset from those.
    acc_t acc[P][V];
    ELSA_UNROLL
    for (int u = 0; u < P; ++u) {
      ELSA_UNROLL
      for (int e = 0; e < V; ++e) acc[u][e] = 0;
    }
    int go[P], ho[P];
    ELSA_UNROLL
    for (int u = 0; u < P; ++u) {
      go[u] = u * int(A.source_strides.column);
      ho[u] = u * int(A.attention_strides.column);
    }
    Global<const T> gorow = gob + ty * A.source_strides.row + tx * A.source_strides.column;
    Global<const T> hrow = hb + ty * A.attention_strides.row + tx * A.attention_strides.column;
    const int go_dx = g.dilation * int(A.source_strides.column),
              h_dx = 1 - g.dilation * int(A.attention_strides.column);
    const int64_t go_dy = int64_t(g.dilation) * A.source_strides.row,
                  h_dy = K - int64_t(g.dilation) * A.attention_strides.row, ghost_row = int64_t(K) * g.C;
    bool shared = false;
    if constexpr (kSharedColumns<KT>) shared = g.dilation == 1;
    if constexpr (kSharedPixels<T> < P) {
      if (shared) {
        shared_parts<T, (KT > 1 ? KT : 2), V, P, kSharedPixels<T>, kMul, kAdd, true>(
            gorow, int(A.source_strides.column), -go_dy, hrow, int(A.attention_strides.column), h_dy, mp, ap, g.C,
            [&](int u, const acc_t(&sums)[V]) { store_vec<T, V>(out + u * A.destination_strides.column, sums); });
        return;
      }
    }
    if (shared) {
      // Input pixel u's tap q reads output column u - q: counted from column -(K - 1), u + K - 1 - q, and
      // the pixels share their vectors. Its attention weight is at that output pixel's tap q.
      const int gcol = int(A.source_strides.column), hcol = int(A.attention_strides.column);
      ELSA_NO_UNROLL
      for (int p = 0; p < K; ++p, gorow -= go_dy, hrow += h_dy) {
        shared_row<T, (KT > 1 ? KT : 2), V, P, kMul, kAdd, true>(acc, gorow, gcol, hrow, hcol, mp, ap, g.C);
      }
    } else {
      ELSA_NO_UNROLL
      for (int p = 0; p < K; ++p, gorow -= go_dy, hrow += h_dy) {
        // Two taps per trip: fewer loop steps and address bases. (Unrolled whole, the run's loads of a row
        // would be hoisted into spilled registers.)
        ELSA_UNROLL_TWICE
        for (int q = 0; q < K; ++q) {
          run_tap<T, V, P, kMul, kAdd>(acc, gorow - q * go_dx, go, hrow + q * h_dx, ho, mp, ap, q * g.C);
        }
        if constexpr (kMul) mp += ghost_row;
        if constexpr (kAdd) ap += ghost_row;
      }
    }
    ELSA_UNROLL
    for (int u = 0; u < P; ++u) store_vec<T, V>(out + u * A.destination_strides.column, acc[u]);
  } else {
    // Pixel by pixel, each stored as soon as it is summed (a run's accumulators indexed by a loop counter
    // would live in local memory).
    for (int u = 0; u < n; ++u) {
      acc_t acc[V];
      ELSA_UNROLL
      for (int e = 0; e < V; ++e) acc[e] = 0;
      const int tu = tx + u;
      int iq = ty / s, ir = ty - iq * s;
      const int jq0 = tu / s, jr0 = tu - jq0 * s;
      ELSA_NO_UNROLL
      for (int p = 0; p < K; ++p) {
        if (ir == 0 && iq >= 0 && iq < g.Ho) {
          const Global<const T> gorow = gob + iq * A.source_strides.row;
          const Global<const T> hrow = hb + iq * A.attention_strides.row;
          int jq = jq0, jr = jr0;
          for (int q = 0; q < K; ++q) {
            if (jr == 0 && jq >= 0 && jq < g.Wo) {
              const int t = p * K + q;
              weighted_tap<T, V, kMul, kAdd>(acc, gorow + jq * A.source_strides.column,
                                             static_cast<acc_t>(load(hrow + (jq * A.attention_strides.column + t))), mp,
                                             ap, int64_t(t) * g.C);
            }
            jq -= A.dilation_div_stride;
            jr -= A.dilation_mod_stride;
            if (jr < 0) {
              jr += s;
              --jq;
            }
          }
        }
        iq -= A.dilation_div_stride;
        ir -= A.dilation_mod_stride;
        if (ir < 0) {
          ir += s;
          --iq;
        }
      }
      store_vec<T, V>(out + u * A.destination_strides.column, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Gradients of the attention and of the ghost kernels in one pass: both are sums of the products
// go[b, i, j, c] * x[b, i*s + dy_t, j*s + dx_t, c], over the channels of a head for the attention and
// over pixels for the ghost kernels, so grad_out, x and h are read once for all three.
//
// A block owns one (image tile, head, chunk) and its threads own (channel vector, tap) pairs of that head;
// consecutive threads take consecutive channel vectors of one tap, so their loads are coalesced. The pixels
// are taken in runs of kRunPixels neighbouring pixels of a row, as in the gathers: each row of the output
// grid is cut into ceil(Wo / kRunPixels) runs, the last one short when kRunPixels does not divide Wo, and
// tiles and steps count run slots (kRunPixels per run, some of them past the row's end). A pair's products
// with the pixels of a run share the row's bounds check and their addresses. The block walks its tile
// step_pixels (P, a multiple of kRunPixels) slots at a time:
//   1. threads < P / kRunPixels store the step's runs (coordinates and tensor offsets) in shared memory;
//   2. every thread forms its pairs' products for the step's pixels: it adds them to its ghost sums
//      (registers, across the whole tile) and stores their ghost_mul-weighted channel sum per pixel in
//      shared memory;
//   3. every thread takes (pixel, tap) items of the step, kAttnThreads apart, sums each over the chunk's channel
//      vectors in a fixed order and writes the attention gradient. The sums of one (pixel, tap) lie next to each
//      other, and a tap's take an odd number of slots (attn_ghost_sum_stride), so that the lanes of a warp,
//      which take neighbouring taps, read from different banks.
// At the end each thread writes its pairs' ghost sums as the tile's partial sums; ghost_reduce_item sums
// the tiles in a fixed order. Nothing is atomic, so results are bit-identical from run to run.
//
// A head with more than kMaxPairs (channel vector, tap) pairs is split into chunks of chunk_vectors channel vectors
// times chunk_taps taps (blockIdx.z); when its channels are split (channel_chunks > 1), the attention gradient goes to
// one partial per channel chunk, summed in order by attn_chunk_sum_item. chunk_vectors divides the head's channel
// vectors, so every pair of a chunk whose tap exists is live and step 3 reads only slots step 2 wrote.
constexpr int kAttnThreads = 256;
constexpr int kPairsPerThread = 2;
constexpr int kMaxPairs = kAttnThreads * kPairsPerThread;

// Slots of one tap's weighted sums in a pixel's sums: its chunk_vectors sums, padded to an odd count. Step 3's
// lanes read neighbouring taps at this stride of 4-byte words, and an odd stride puts 32 of them in 32 distinct
// banks; an even one (chunk_vectors + 1 for an odd chunk_vectors) would fold them onto half the banks or fewer.
ELSA_HD constexpr int attn_ghost_sum_stride(int chunk_vectors) {
  return chunk_vectors | 1;
}

template <typename T>
struct AttnGhostArgs {
  Geometry<int> geometry;
  int channels_per_group;
  Global<const T> grad_out;
  PixelStrides grad_out_strides;
  Global<const T> features;
  PixelStrides feature_strides;
  Global<const T> attention;  // needed for grad_mul only
  AttentionStrides attention_strides;
  Global<const acc_of<T>> ghost_mul;  // weights the attention gradient; null: 1
  int64_t ghost_mul_batch_stride;
  // Outputs; null when not asked for.
  Global<T> grad_attention;                   // [B, Ho, Wo, G, K*K] contiguous, when the head's channels are one chunk
  Global<acc_of<T>> grad_attention_partials;  // [channel chunks, B, Ho, Wo, G, K*K], when they are several
  Global<acc_of<T>> ghost_mul_partials;       // [B * tiles, K*K, C] ghost partial sums
  Global<acc_of<T>> ghost_add_partials;
  // Work split.
  int tiles_per_image;
  int tile_pixels;     // run slots per tile, a multiple of step_pixels (the last tile may have fewer)
  int step_pixels;     // run slots per step, a multiple of kRunPixels
  int chunk_vectors;   // channel vectors per chunk
  int chunk_taps;      // taps per chunk
  int channel_chunks;  // chunks along the head's channel vectors; blockIdx.z = tap chunk * channel_chunks +
                       // channel chunk
};

// What a thread keeps in registers across the steps of its tile.
template <typename A, int V>
struct AttnGhostThread {
  bool live[kPairsPerThread];
  int c[kPairsPerThread], t[kPairsPerThread], dy[kPairsPerThread], dx[kPairsPerThread];
  int64_t x_off[kPairsPerThread];  // the tap's offset in x from its output pixel, plus the channel
  // The pixels of a row whose tap lies inside the image have x coordinates j * stride + dx in [0, x_lim);
  // x_lim = min(W, Wo * stride + dx) also stops a run at the row's last pixel.
  int x_lim[kPairsPerThread];
  int sum_slot[kPairsPerThread];  // the pair's weighted sum in a pixel's sums: tap * sum stride + vector
  int sum_n, sum_tl;              // the thread's first item of step 3: pixel tid / chunk_taps, tap tid % chunk_taps
  A mv[kPairsPerThread][V], sum_mul[kPairsPerThread][V], sum_add[kPairsPerThread][V];
};

// One run of a step, as every pair needs it: computed once per step by one thread.
struct StepRun {
  int64_t go, x, h;  // offsets of the run's first pixel in grad_out and x (channel 0) and in h (the head's tap 0)
  int ys, xs;        // i * stride and j * stride of that pixel
  int pix;           // i * Wo + j
  int count;         // the run's pixels: kRunPixels, fewer at the end of a row, 0 past the end of the tile
};

// Run slots per row of the output grid (for the launcher's 64-bit geometry too).
template <typename Index>
ELSA_HD Index attn_ghost_row_slots(const Geometry<Index>& g) {
  return (g.Wo + kRunPixels - 1) / kRunPixels * kRunPixels;
}

// Shared memory of one block: step_pixels / kRunPixels StepRuns, then for each of the step's pixels its
// chunk_taps * attn_ghost_sum_stride(chunk_vectors) weighted sums (a tap's chunk_vectors sums, padded to odd).
template <typename T>
ELSA_HD int attn_ghost_pixel_sums(const AttnGhostArgs<T>& A) {
  return A.chunk_taps * attn_ghost_sum_stride(A.chunk_vectors);
}
template <typename T>
ELSA_HD int64_t attn_ghost_shared_sums(const AttnGhostArgs<T>& A) {
  return int64_t(A.step_pixels) * attn_ghost_pixel_sums(A);
}
template <typename T>
ELSA_HD int64_t attn_ghost_shared_bytes(const AttnGhostArgs<T>& A) {
  return int64_t(A.step_pixels / kRunPixels) * sizeof(StepRun) + attn_ghost_shared_sums(A) * sizeof(acc_of<T>);
}

// The products of one (channel vector, tap) pair of the thread with one output pixel: they are added to the
// pair's ghost sums, and their ghost_mul-weighted channel sum is stored at `sum` for step 3. Compiled with
// and without ghost_mul (kMv: its values weight the sum) and the gradient of ghost_mul (kGradMul: reads h);
// without both, each channel's product is two FFMAs.
template <typename T, int V, bool kMv, bool kGradMul>
ELSA_HD void pair_products(acc_of<T> (&sum_mul)[V], acc_of<T> (&sum_add)[V], const acc_of<T> (&mv)[V],
                           Global<const T> go, Global<const T> x, Global<const T> h, Shared<acc_of<T>> sum) {
  using acc_t = acc_of<T>;
  acc_t gv[V], xv[V], weighted = 0, w = 0;
  load_vec<T, V>(go, gv);
  load_vec<T, V>(x, xv);
  if constexpr (kGradMul) w = static_cast<acc_t>(load(h));
  ELSA_UNROLL
  for (int e = 0; e < V; ++e) {
    if constexpr (kMv || kGradMul) {
      const acc_t prod = gv[e] * xv[e];
      weighted = fused_multiply_add(prod, mv[e], weighted);
      sum_add[e] += prod;
      if constexpr (kGradMul) sum_mul[e] = fused_multiply_add(prod, w, sum_mul[e]);
    } else {
      weighted = fused_multiply_add(gv[e], xv[e], weighted);
      sum_add[e] = fused_multiply_add(gv[e], xv[e], sum_add[e]);
    }
  }
  store(sum, weighted);
}

template <typename T>
ELSA_HD int attn_ghost_t_chunks(const AttnGhostArgs<T>& A) {
  return (A.geometry.K * A.geometry.K + A.chunk_taps - 1) / A.chunk_taps;
}

// `Block` runs a lambda for each of its threads with that thread's AttnGhostThread (`threads`), gives the
// block's dynamic shared memory (`shared`) and places barriers (`sync`); a barrier separates every two
// `threads` steps.
template <typename T, int KT, int V, class Block>
ELSA_HD void attn_ghost_block(const AttnGhostArgs<T>& A, Block& blk, int tile_index, int grp, int chunk) {
  using acc_t = acc_of<T>;
  using Thread = AttnGhostThread<acc_t, V>;
  const Geometry<int>& g = A.geometry;
  const int K = kernel_size<KT>(g), r = K / 2, KK = K * K;
  const int b = tile_index / A.tiles_per_image, tile = tile_index - b * A.tiles_per_image;
  const int tc = chunk / A.channel_chunks, cc = chunk - tc * A.channel_chunks;
  const int npairs = A.chunk_vectors * A.chunk_taps, pixel_sums = attn_ghost_pixel_sums(A);
  const int row_slots = attn_ghost_row_slots(g), plane = g.Ho * row_slots, step_runs = A.step_pixels / kRunPixels;
  const int pix0 = tile * A.tile_pixels;
  const int pix1 = pix0 + A.tile_pixels < plane ? pix0 + A.tile_pixels : plane;
  const int cv_in_group = A.channels_per_group / V;
  const int64_t shared_bytes = attn_ghost_shared_bytes(A);
  const Shared<StepRun> s_run = shared_region<StepRun>(blk.shared(), shared_bytes, 0, step_runs, "step runs");
  const Shared<acc_t> s_sum = shared_region<acc_t>(blk.shared(), shared_bytes, int64_t(step_runs) * sizeof(StepRun),
                                                   attn_ghost_shared_sums(A), "weighted sums");
  const bool need_attn = A.grad_attention != nullptr || A.grad_attention_partials != nullptr;
  const bool need_mul = A.ghost_mul_partials != nullptr, need_add = A.ghost_add_partials != nullptr;

  blk.threads([&](int tid, Thread& th) {
    ELSA_UNROLL
    for (int k = 0; k < kPairsPerThread; ++k) {
      const int e = tid + k * kAttnThreads;
      const int cvl = e % A.chunk_vectors, tl = e / A.chunk_vectors;
      const int cv = cc * A.chunk_vectors + cvl, t = tc * A.chunk_taps + tl;
      th.live[k] = e < npairs && cv < cv_in_group && t < KK;
      th.sum_slot[k] = tl * attn_ghost_sum_stride(A.chunk_vectors) + cvl;
      th.c[k] = grp * A.channels_per_group + cv * V;
      th.t[k] = t;
      const int p = t / K, q = t - p * K;
      th.dy[k] = (p - r) * g.dilation;
      th.dx[k] = (q - r) * g.dilation;
      th.x_off[k] = th.dy[k] * A.feature_strides.row + th.dx[k] * A.feature_strides.column + th.c[k];
      const int x_end = g.Wo * g.stride + th.dx[k];
      th.x_lim[k] = x_end < 0 ? 0 : x_end < g.W ? x_end : g.W;
      ELSA_UNROLL
      for (int e2 = 0; e2 < V; ++e2) {
        th.mv[k][e2] = 1;
        th.sum_mul[k][e2] = 0;
        th.sum_add[k][e2] = 0;
      }
      if (th.live[k] && A.ghost_mul)
        load_acc<acc_t, V>(A.ghost_mul + b * A.ghost_mul_batch_stride + int64_t(t) * g.C + th.c[k], th.mv[k]);
    }
    th.sum_n = tid / A.chunk_taps;
    th.sum_tl = tid - th.sum_n * A.chunk_taps;
  });
  blk.sync();

  for (int start = pix0; start < pix1; start += A.step_pixels) {
    // 1. the step's runs
    blk.threads([&](int tid, Thread&) {
      if (tid < step_runs) {
        const int slot = start + tid * kRunPixels;
        StepRun sr{};
        if (slot < pix1) {
          const int i = slot / row_slots, j = slot - i * row_slots;
          sr.go = b * A.grad_out_strides.batch + i * A.grad_out_strides.row + j * A.grad_out_strides.column;
          sr.ys = i * g.stride;
          sr.xs = j * g.stride;
          sr.x = b * A.feature_strides.batch + sr.ys * A.feature_strides.row + sr.xs * A.feature_strides.column;
          sr.h = b * A.attention_strides.batch + i * A.attention_strides.row + j * A.attention_strides.column +
                 grp * A.attention_strides.group;
          sr.pix = i * g.Wo + j;
          sr.count = g.Wo - j < kRunPixels ? g.Wo - j : kRunPixels;
        }
        store(s_run + tid, sr);
      }
    });
    blk.sync();
    // 2. products of the threads' pairs. Every slot's weighted sum is stored, 0 for a pixel whose tap falls
    // outside the image or that lies past its row. A pair steps from a run's pixel to the next with 32-bit
    // offsets (the launcher has checked that a step fits) and unsigned x coordinates (exact below 2^32,
    // where the steps past a row's last pixel may pass 2^31).
    auto products = [&]<bool kMv, bool kGradMul>(int tid, Thread& th) {
      const int go_step = int(A.grad_out_strides.column), h_step = int(A.attention_strides.column);
      const int x_step = int(g.stride * A.feature_strides.column);
      // Runs outside, pairs inside: the two pairs share the run's loads from shared memory.
      for (int q = 0; q < step_runs; ++q) {
        const StepRun sr = ref(s_run + q);
        if (sr.count == 0) break;  // past the tile's end, as are the runs after it
        ELSA_UNROLL
        for (int k = 0; k < kPairsPerThread; ++k) {
          if (!th.live[k]) continue;
          Shared<acc_t> sum = s_sum + (q * kRunPixels * pixel_sums + th.sum_slot[k]);
          Global<const T> go = A.grad_out + (sr.go + th.c[k]);
          Global<const T> x = A.features + (sr.x + th.x_off[k]);
          Global<const T> h = nullptr;
          if constexpr (kGradMul) h = A.attention + (sr.h + th.t[k]);
          const unsigned lim = unsigned(sr.ys + th.dy[k]) < unsigned(g.H) ? unsigned(th.x_lim[k]) : 0u;
          unsigned xx = unsigned(sr.xs + th.dx[k]);
          ELSA_UNROLL
          for (int u = 0; u < kRunPixels; ++u) {
            if (xx < lim) {
              pair_products<T, V, kMv, kGradMul>(th.sum_mul[k], th.sum_add[k], th.mv[k], go, x, h, sum);
            } else {
              store(sum, acc_t(0));
            }
            go += go_step;
            x += x_step;
            if constexpr (kGradMul) h += h_step;
            xx += unsigned(g.stride);
            sum += pixel_sums;
          }
        }
      }
    };
    blk.threads([&](int tid, Thread& th) {
      if (need_mul) {
        products.template operator()<true, true>(tid, th);
      } else if (A.ghost_mul) {
        products.template operator()<true, false>(tid, th);
      } else {
        products.template operator()<false, false>(tid, th);
      }
    });
    blk.sync();
    // 3. the attention gradient: each (pixel, tap) of the step summed over the chunk's channel vectors, in order,
    // by one thread; a thread's items are kAttnThreads apart (its pixel and tap step without dividing).
    if (need_attn) {
      const int jump_n = kAttnThreads / A.chunk_taps, jump_tl = kAttnThreads - jump_n * A.chunk_taps;
      blk.threads([&](int, Thread& th) {
        int n = th.sum_n, tl = th.sum_tl;
        while (n < A.step_pixels) {
          const StepRun& sr = ref(s_run + n / kRunPixels);
          const int u = n % kRunPixels, t = tc * A.chunk_taps + tl;
          if (u < sr.count && t < KK) {
            const int64_t out_pix = (int64_t(b) * g.Ho * g.Wo + sr.pix + u) * g.G + grp;
            const Shared<acc_t> sums = s_sum + (n * pixel_sums + tl * attn_ghost_sum_stride(A.chunk_vectors));
            acc_t total = 0;
            // (not unrolled: for a count known only at run time that is a cascade of remainders per item)
            ELSA_NO_UNROLL
            for (int cvl = 0; cvl < A.chunk_vectors; ++cvl) total += load(sums + cvl);
            if (A.grad_attention) {
              store(A.grad_attention + (out_pix * KK + t), static_cast<T>(total));
            } else {
              const int64_t numel = int64_t(g.B) * g.Ho * g.Wo * g.G * KK;
              store(A.grad_attention_partials + (cc * numel + out_pix * KK + t), total);
            }
          }
          n += jump_n;
          tl += jump_tl;
          if (tl >= A.chunk_taps) {
            tl -= A.chunk_taps;
            ++n;
          }
        }
      });
      blk.sync();
    }
  }

  if (need_mul || need_add) {
    blk.threads([&](int, Thread& th) {
      ELSA_UNROLL
      for (int k = 0; k < kPairsPerThread; ++k) {
        if (!th.live[k]) continue;
        const int64_t at = (int64_t(tile_index) * KK + th.t[k]) * g.C + th.c[k];
        ELSA_UNROLL
        for (int e2 = 0; e2 < V; ++e2) {
          if (need_mul) store(A.ghost_mul_partials + (at + e2), th.sum_mul[k][e2]);
          if (need_add) store(A.ghost_add_partials + (at + e2), th.sum_add[k][e2]);
        }
      }
    });
  }
}

// Ghost gradients: out[u, c, t] = sum of part[tile, t, c] over the tiles of unit u (all tiles for a broadcast
// kernel, the tiles of image u for a per-image one). Items (u, t, c), c fastest, kReduceItems per block; each
// item's tiles are cut into kReduceSlices slices (slice s: tiles s, s + kReduceSlices, ...), each summed in tile
// order by one thread, and the slices' sums are then added in slice order by the item's first thread, so that
// the order depends only on the shapes and the result is the same on every run.
constexpr int kReduceSlices = 8;
constexpr int kReduceThreads = 256;
constexpr int kReduceItems = kReduceThreads / kReduceSlices;

template <typename A>
struct GhostReduceArgs {
  Global<const A> partials;  // [units * tiles_per_unit, K*K, C]
  Global<A> output;          // [units, C, K*K]
  int64_t units, tiles_per_unit, taps, channels;
};

template <typename A>
struct GhostReduceThread {};

template <typename A, class Block>
ELSA_HD void ghost_reduce_block(const GhostReduceArgs<A>& R, Block& blk, int64_t block_index, int64_t items) {
  const Shared<A> s_part = shared_region<A>(blk.shared(), kReduceThreads * sizeof(A), 0, kReduceThreads, "slice sums");
  const int64_t table = R.taps * R.channels;
  blk.threads([&](int tid, GhostReduceThread<A>&) {
    const int lane = tid % kReduceItems, slice = tid / kReduceItems;
    const int64_t item = block_index * kReduceItems + lane;
    A total = 0;
    if (item < items) {
      const int64_t u = item / table, rest = item - u * table;
      const Global<const A> p = R.partials + (u * R.tiles_per_unit * table + rest);
      for (int64_t k = slice; k < R.tiles_per_unit; k += kReduceSlices) total += load(p + k * table);
    }
    store(s_part + tid, total);
  });
  blk.sync();
  blk.threads([&](int tid, GhostReduceThread<A>&) {
    const int64_t item = block_index * kReduceItems + tid;
    if (tid >= kReduceItems || item >= items) return;
    A total = 0;
    for (int s = 0; s < kReduceSlices; ++s) total += load(s_part + (s * kReduceItems + tid));
    const int64_t u = item / table, rest = item - u * table, t = rest / R.channels, c = rest - t * R.channels;
    store(R.output + (u * table + c * R.taps + t), total);
  });
}

// Attention gradient of heads split into several channel chunks: the chunks' partials summed in order.
template <typename T>
struct ChunkSumArgs {
  Global<const acc_of<T>> partials;  // [chunks, numel]
  Global<T> output;
  int64_t numel;
  int chunks;
};

template <typename T>
ELSA_HD void attn_chunk_sum_item(const ChunkSumArgs<T>& S, int64_t item) {
  acc_of<T> total = 0;
  for (int k = 0; k < S.chunks; ++k) total += load(S.partials + (k * S.numel + item));
  store(S.output + item, static_cast<T>(total));
}

}  // namespace elsa_op::gpu
