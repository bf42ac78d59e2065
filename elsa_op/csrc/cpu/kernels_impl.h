// Vector code of the channels-last kernels (see kernels.h for what each computes).
//
// Included by kernels_<isa>.cpp inside namespace elsa_op::cpu::isa_<isa>, after the instruction
// set is chosen and with ELSA_VECTOR_BYTES defined. It uses no library templates: an instantiation
// compiled for AVX2 must never be merged by the linker with one that a baseline CPU runs.
//
// Channels are contiguous, so each output pixel is summed over its in-image taps with the channels of
// one group in vector registers (blocks of four vectors, then one, then scalars). Every kernel gathers,
// so no two threads write the same element and the results do not depend on the number of threads.

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(ELSA_VECTOR_BYTES)));
  static constexpr int64_t lanes = ELSA_VECTOR_BYTES / sizeof(T);
};

// L is a vector type, or T itself for the scalar tail.
template <typename L, typename T>
inline L load(const T* p) {
  L v;
  __builtin_memcpy(&v, p, sizeof(L));
  return v;
}

template <typename L, typename T>
inline void store(T* p, const L& v) {
  __builtin_memcpy(p, &v, sizeof(L));
}

template <typename T>
inline T lane_sum(const typename Vec<T>::type& v) {
  T sum = 0;
  for (int64_t k = 0; k < Vec<T>::lanes; ++k) sum += v[k];
  return sum;
}

// The taps of one pixel: tap index, offset of its values from the pixel's value pointer, and offset of its
// attention value from the pixel's attention pointer (before the group's K*K offset).
struct TapList {
  int64_t n = 0;
  int64_t* tap;
  int64_t* src;
  int64_t* attn;
  explicit TapList(int64_t kk) : tap(new int64_t[kk]), src(new int64_t[kk]), attn(new int64_t[kk]) {}
  ~TapList() {
    delete[] tap;
    delete[] src;
    delete[] attn;
  }
  TapList(const TapList&) = delete;
  TapList& operator=(const TapList&) = delete;

  void push(int64_t t, int64_t src_offset, int64_t attn_offset) {
    tap[n] = t;
    src[n] = src_offset;
    attn[n] = attn_offset;
    ++n;
  }
};

// Taps of an output pixel at input position (y, x) (its window centre) whose value lies inside the image,
// with offsets relative to that position; all K*K of them inside the image.
inline void window_taps(const Geometry<int64_t>& geo, const GridStrides& strides, int64_t y, int64_t x,
                        bool gather_from_outputs, TapList& list) {
  const int64_t r = geo.radius(), kk = geo.taps();
  list.n = 0;
  for (int64_t p = 0; p < geo.K; ++p) {
    const int64_t dy = (p - r) * geo.dilation;
    for (int64_t q = 0; q < geo.K; ++q) {
      const int64_t dx = (q - r) * geo.dilation, t = p * geo.K + q;
      if (!gather_from_outputs) {
        if (y + dy < 0 || y + dy >= geo.H || x + dx < 0 || x + dx >= geo.W) continue;
        list.push(t, dy * strides.input.row + dx * strides.input.column, t);
      } else {
        // Unit stride: input pixel (y, x) is reached from output pixel (y - dy, x - dx) through tap t.
        if (y - dy < 0 || y - dy >= geo.Ho || x - dx < 0 || x - dx >= geo.Wo) continue;
        list.push(t, -(dy * strides.output.row + dx * strides.output.column), t - (dy * geo.Wo + dx) * geo.G * kk);
      }
    }
  }
}

// acc[px] = sum_k v[px][src_k + c..] * (mul[t_k, c..] * attn[px][attn_k + hg] + add[t_k, c..]) for NP pixels
// and NV blocks of L; the ghost values are loaded once for all NP pixels.
template <typename T, typename L, int NV, int NP, bool kMul, bool kAdd>
inline void weighted_block(T* const* dst, const T* const* v, const T* const* attn, int64_t c, const TapList& taps,
                           int64_t hg, const T* mul, const T* add, int64_t C) {
  constexpr int64_t N = sizeof(L) / sizeof(T);
  L acc[NP][NV];
  for (int px = 0; px < NP; ++px)
    for (int u = 0; u < NV; ++u) acc[px][u] = L{};
  for (int64_t k = 0; k < taps.n; ++k) {
    const int64_t t = taps.tap[k], so = taps.src[k] + c, ao = taps.attn[k] + hg;
    L mv[NV], av[NV];
    for (int u = 0; u < NV; ++u) {
      if constexpr (kMul) mv[u] = load<L>(mul + t * C + c + u * N);
      if constexpr (kAdd) av[u] = load<L>(add + t * C + c + u * N);
    }
    for (int px = 0; px < NP; ++px) {
      const T hv = attn[px][ao];
      for (int u = 0; u < NV; ++u) {
        L w;
        if constexpr (kMul)
          w = mv[u] * hv;
        else
          w = L{} + hv;
        if constexpr (kAdd) w += av[u];
        acc[px][u] += load<L>(v[px] + so + u * N) * w;
      }
    }
  }
  for (int px = 0; px < NP; ++px)
    for (int u = 0; u < NV; ++u) store(dst[px] + c + u * N, acc[px][u]);
}

// NP pixels of forward or grad-features that share one tap list: every group's channels.
template <typename T, int NP, bool kMul, bool kAdd>
inline void weighted_pixels(const Geometry<int64_t>& geo, T* const* dst, const T* const* v, const T* const* attn,
                            const TapList& taps, const T* mul, const T* add) {
  using V = typename Vec<T>::type;
  constexpr int64_t N = Vec<T>::lanes;
  const int64_t cpg = geo.channels_per_group();
  for (int64_t g = 0; g < geo.G; ++g) {
    const int64_t c1 = (g + 1) * cpg, hg = g * geo.taps();
    int64_t c = g * cpg;
    for (; c + 4 * N <= c1; c += 4 * N)
      weighted_block<T, V, 4, NP, kMul, kAdd>(dst, v, attn, c, taps, hg, mul, add, geo.C);
    for (; c + N <= c1; c += N) weighted_block<T, V, 1, NP, kMul, kAdd>(dst, v, attn, c, taps, hg, mul, add, geo.C);
    for (; c < c1; ++c) weighted_block<T, T, 1, NP, kMul, kAdd>(dst, v, attn, c, taps, hg, mul, add, geo.C);
  }
}

// Forward and unit-stride grad-features: one pass over rows of pixels whose windows are described
// relative to the pixel, two pixels at a time where both windows lie inside the image.
//   forward:   pixel (i, j) reads x around (i*s, j*s) and its own attention;
//   grad_x:    pixel (y, x) reads grad_out and attention of the output pixels whose windows cover it.
template <typename T, bool kMul, bool kAdd>
void weighted_rows(const Geometry<int64_t>& geo, const GridStrides& strides, bool grad_x, const T* v, const T* h,
                   Ghost<T> ghost, T* out, int64_t row0, int64_t row1) {
  const int64_t kk = geo.taps(), reach = geo.radius() * geo.dilation;
  const int64_t rows = grad_x ? geo.H : geo.Ho, cols = grad_x ? geo.W : geo.Wo, step = grad_x ? 1 : geo.stride;
  // Output pixels whose whole window is inside the image, per axis.
  const int64_t limit_h = grad_x ? geo.Ho : geo.H, limit_w = grad_x ? geo.Wo : geo.W;
  auto inside = [&](int64_t k, int64_t limit) { return k * step - reach >= 0 && k * step + reach < limit; };
  TapList full(kk), part(kk);
  window_taps(geo, strides, reach, reach, grad_x, full);  // a pixel far enough from every border
  // Pointers of pixel (b, i, j): its destination, its values and its attention.
  const int64_t v_b = grad_x ? strides.output.batch : strides.input.batch,
                v_h = grad_x ? strides.output.row : strides.input.row,
                v_w = grad_x ? strides.output.column : strides.input.column;
  const int64_t d_b = grad_x ? strides.input.batch : strides.output.batch,
                d_h = grad_x ? strides.input.row : strides.output.row,
                d_w = grad_x ? strides.input.column : strides.output.column;
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t b = row / rows, i = row % rows;
    const T* mul = kMul ? ghost.mul + b * ghost.mul_batch_stride : nullptr;
    const T* add = kAdd ? ghost.add + b * ghost.add_batch_stride : nullptr;
    const bool row_inside = inside(i, limit_h);
    auto pointers = [&](int64_t j, T*& d, const T*& vp, const T*& hp) {
      d = out + b * d_b + i * d_h + j * d_w;
      vp = v + b * v_b + i * step * v_h + j * step * v_w;
      hp = h + ((b * geo.Ho + i) * geo.Wo + j) * geo.G * kk;  // unit stride for grad_x, so Ho == H
    };
    for (int64_t j = 0; j < cols;) {
      if (row_inside && j + 1 < cols && inside(j, limit_w) && inside(j + 1, limit_w)) {
        T* d[2];
        const T *vp[2], *hp[2];
        pointers(j, d[0], vp[0], hp[0]);
        pointers(j + 1, d[1], vp[1], hp[1]);
        weighted_pixels<T, 2, kMul, kAdd>(geo, d, vp, hp, full, mul, add);
        j += 2;
        continue;
      }
      T* d[1];
      const T *vp[1], *hp[1];
      pointers(j, d[0], vp[0], hp[0]);
      const bool all = row_inside && inside(j, limit_w);
      if (!all) window_taps(geo, strides, i * step, j * step, grad_x, part);
      weighted_pixels<T, 1, kMul, kAdd>(geo, d, vp, hp, all ? full : part, mul, add);
      ++j;
    }
  }
}

// Grad-features with stride > 1: each input pixel lists the output pixels it reaches, in absolute offsets.
template <typename T, bool kMul, bool kAdd>
void grad_features_strided_rows(const Geometry<int64_t>& geo, const GridStrides& strides, const T* go, const T* h,
                                Ghost<T> ghost, T* gx, int64_t row0, int64_t row1) {
  const int64_t r = geo.radius(), kk = geo.taps();
  TapList taps(kk);
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t b = row / geo.H, y = row % geo.H;
    const T* mul = kMul ? ghost.mul + b * ghost.mul_batch_stride : nullptr;
    const T* add = kAdd ? ghost.add + b * ghost.add_batch_stride : nullptr;
    for (int64_t x = 0; x < geo.W; ++x) {
      taps.n = 0;
      for (int64_t p = 0; p < geo.K; ++p) {
        const int64_t ty = y - (p - r) * geo.dilation;
        if (ty < 0 || ty % geo.stride != 0 || ty / geo.stride >= geo.Ho) continue;
        for (int64_t q = 0; q < geo.K; ++q) {
          const int64_t tx = x - (q - r) * geo.dilation;
          if (tx < 0 || tx % geo.stride != 0 || tx / geo.stride >= geo.Wo) continue;
          const int64_t oi = ty / geo.stride, oj = tx / geo.stride;
          taps.push(p * geo.K + q, oi * strides.output.row + oj * strides.output.column,
                    (oi * geo.Wo + oj) * geo.G * kk + p * geo.K + q);
        }
      }
      T* d[1] = {gx + b * strides.input.batch + y * strides.input.row + x * strides.input.column};
      const T* vp[1] = {go + b * strides.output.batch};
      const T* hp[1] = {h + b * geo.Ho * geo.Wo * geo.G * kk};
      weighted_pixels<T, 1, kMul, kAdd>(geo, d, vp, hp, taps, mul, add);
    }
  }
}

template <typename T, bool kMul, bool kAdd>
void grad_features_rows_impl(const Geometry<int64_t>& geo, const GridStrides& strides, const T* go, const T* h,
                             Ghost<T> ghost, T* gx, int64_t row0, int64_t row1) {
  if (geo.stride == 1)
    weighted_rows<T, kMul, kAdd>(geo, strides, true, go, h, ghost, gx, row0, row1);
  else
    grad_features_strided_rows<T, kMul, kAdd>(geo, strides, go, h, ghost, gx, row0, row1);
}

template <typename T, bool kMul, bool kAdd>
void forward_rows_impl(const Geometry<int64_t>& geo, const GridStrides& strides, const T* x, const T* h, Ghost<T> ghost,
                       T* out, int64_t row0, int64_t row1) {
  weighted_rows<T, kMul, kAdd>(geo, strides, false, x, h, ghost, out, row0, row1);
}

// sum over c in [c0, c1) of a[c] * b[c] (* w[c] with kMul).
template <typename T, bool kMul>
inline T channel_dot(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w, int64_t c0,
                     int64_t c1) {
  using V = typename Vec<T>::type;
  constexpr int64_t N = Vec<T>::lanes;
  V acc0{}, acc1{};
  int64_t c = c0;
  for (; c + 2 * N <= c1; c += 2 * N) {
    V p0 = load<V>(a + c) * load<V>(b + c), p1 = load<V>(a + c + N) * load<V>(b + c + N);
    if constexpr (kMul) {
      p0 *= load<V>(w + c);
      p1 *= load<V>(w + c + N);
    }
    acc0 += p0;
    acc1 += p1;
  }
  for (; c + N <= c1; c += N) {
    V p = load<V>(a + c) * load<V>(b + c);
    if constexpr (kMul) p *= load<V>(w + c);
    acc0 += p;
  }
  T sum = lane_sum<T>(acc0 + acc1);
  for (; c < c1; ++c) sum += a[c] * b[c] * (kMul ? w[c] : T(1));
  return sum;
}

template <typename T, bool kMul>
void grad_attn_rows_impl(const Geometry<int64_t>& geo, const GridStrides& strides, const T* go, const T* x,
                         const T* mul_all, int64_t mul_batch_stride, T* gh, int64_t row0, int64_t row1) {
  const int64_t kk = geo.taps(), cpg = geo.channels_per_group(), reach = geo.radius() * geo.dilation;
  TapList full(kk), part(kk);
  window_taps(geo, strides, reach, reach, false, full);
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t b = row / geo.Ho, i = row % geo.Ho;
    const T* mul = kMul ? mul_all + b * mul_batch_stride : nullptr;
    const bool row_inside = i * geo.stride - reach >= 0 && i * geo.stride + reach < geo.H;
    for (int64_t j = 0; j < geo.Wo; ++j) {
      const bool all = row_inside && j * geo.stride - reach >= 0 && j * geo.stride + reach < geo.W;
      if (!all) window_taps(geo, strides, i * geo.stride, j * geo.stride, false, part);
      const TapList& taps = all ? full : part;
      const T* g_out = go + b * strides.output.batch + i * strides.output.row + j * strides.output.column;
      const T* x_centre =
          x + b * strides.input.batch + i * geo.stride * strides.input.row + j * geo.stride * strides.input.column;
      T* dst = gh + ((b * geo.Ho + i) * geo.Wo + j) * geo.G * kk;
      if (!all)
        for (int64_t e = 0; e < geo.G * kk; ++e) dst[e] = T(0);
      for (int64_t g = 0; g < geo.G; ++g)
        for (int64_t k = 0; k < taps.n; ++k) {
          const int64_t t = taps.tap[k];
          dst[g * kk + t] = channel_dot<T, kMul>(g_out, x_centre + taps.src[k], kMul ? mul + t * geo.C : nullptr,
                                                 g * cpg, (g + 1) * cpg);
        }
    }
  }
}

// ghost_add[t, c..] and ghost_mul[t, c..] summed over output rows [row0, row1) of image b for one tap:
// the sums stay in registers while the rows are swept.
template <typename T, typename L, int NV, bool kMul, bool kAdd>
inline void ghost_block(const Geometry<int64_t>& geo, const GridStrides& strides, const T* go, const T* x, const T* h,
                        T* gm, T* ga, int64_t b, int64_t t, int64_t g, int64_t c, int64_t i0, int64_t i1, int64_t j0,
                        int64_t j1, int64_t dy, int64_t dx) {
  constexpr int64_t N = sizeof(L) / sizeof(T);
  L am[NV], aa[NV];
  for (int u = 0; u < NV; ++u) am[u] = aa[u] = L{};
  const int64_t kk = geo.taps();
  for (int64_t i = i0; i < i1; ++i) {
    const T* go_row = go + b * strides.output.batch + i * strides.output.row + c;
    const T* x_row =
        x + b * strides.input.batch + (i * geo.stride + dy) * strides.input.row + dx * strides.input.column + c;
    const T* h_row = kMul ? h + ((b * geo.Ho + i) * geo.Wo) * geo.G * kk + g * kk + t : nullptr;
    for (int64_t j = j0; j < j1; ++j) {
      const T* gp = go_row + j * strides.output.column;
      const T* xp = x_row + j * geo.stride * strides.input.column;
      const T hv = kMul ? h_row[j * geo.G * kk] : T(0);
      for (int u = 0; u < NV; ++u) {
        const L prod = load<L>(gp + u * N) * load<L>(xp + u * N);
        if constexpr (kAdd) aa[u] += prod;
        if constexpr (kMul) am[u] += prod * hv;
      }
    }
  }
  for (int u = 0; u < NV; ++u) {
    if constexpr (kAdd) store(ga + t * geo.C + c + u * N, load<L>(ga + t * geo.C + c + u * N) + aa[u]);
    if constexpr (kMul) store(gm + t * geo.C + c + u * N, load<L>(gm + t * geo.C + c + u * N) + am[u]);
  }
}

template <typename T, bool kMul, bool kAdd>
void grad_ghost_rows_impl(const Geometry<int64_t>& geo, const GridStrides& strides, const T* go, const T* x, const T* h,
                          T* gm, T* ga, int64_t b, int64_t row0, int64_t row1) {
  using V = typename Vec<T>::type;
  constexpr int64_t N = Vec<T>::lanes;
  const int64_t r = geo.radius(), cpg = geo.channels_per_group();
  for (int64_t p = 0; p < geo.K; ++p)
    for (int64_t q = 0; q < geo.K; ++q) {
      const int64_t t = p * geo.K + q, dy = (p - r) * geo.dilation, dx = (q - r) * geo.dilation;
      int64_t i0, i1, j0, j1;
      valid_columns(dy, geo.stride, geo.H, geo.Ho, i0, i1);
      valid_columns(dx, geo.stride, geo.W, geo.Wo, j0, j1);
      i0 = i0 > row0 ? i0 : row0;
      i1 = i1 < row1 ? i1 : row1;
      if (i0 >= i1 || j0 >= j1) continue;
      for (int64_t g = 0; g < geo.G; ++g) {
        const int64_t c1 = (g + 1) * cpg;
        int64_t c = g * cpg;
        for (; c + 4 * N <= c1; c += 4 * N)
          ghost_block<T, V, 4, kMul, kAdd>(geo, strides, go, x, h, gm, ga, b, t, g, c, i0, i1, j0, j1, dy, dx);
        for (; c + N <= c1; c += N)
          ghost_block<T, V, 1, kMul, kAdd>(geo, strides, go, x, h, gm, ga, b, t, g, c, i0, i1, j0, j1, dy, dx);
        for (; c < c1; ++c)
          ghost_block<T, T, 1, kMul, kAdd>(geo, strides, go, x, h, gm, ga, b, t, g, c, i0, i1, j0, j1, dy, dx);
      }
    }
}

// Calls f.template operator()<flags...>() with the runtime flags as template arguments: each combination
// gets its own instantiation, with the work of an absent ghost kernel compiled out of its inner loops.
template <bool... kFlags, typename F>
inline void with_flags(F&& f) {
  f.template operator()<kFlags...>();
}

template <bool... kFlags, typename... Rest>
inline void with_flags(bool flag, Rest&&... rest) {
  if (flag)
    with_flags<kFlags..., true>(static_cast<Rest&&>(rest)...);
  else
    with_flags<kFlags..., false>(static_cast<Rest&&>(rest)...);
}

template <typename T>
void forward_rows(const Geometry<int64_t>& geo, const GridStrides& strides, const T* x, const T* h, Ghost<T> ghost,
                  T* out, int64_t row0, int64_t row1) {
  with_flags(ghost.mul != nullptr, ghost.add != nullptr, [&]<bool kMul, bool kAdd>() {
    forward_rows_impl<T, kMul, kAdd>(geo, strides, x, h, ghost, out, row0, row1);
  });
}

template <typename T>
void grad_features_rows(const Geometry<int64_t>& geo, const GridStrides& strides, const T* go, const T* h,
                        Ghost<T> ghost, T* gx, int64_t row0, int64_t row1) {
  with_flags(ghost.mul != nullptr, ghost.add != nullptr, [&]<bool kMul, bool kAdd>() {
    grad_features_rows_impl<T, kMul, kAdd>(geo, strides, go, h, ghost, gx, row0, row1);
  });
}

template <typename T>
void grad_attn_rows(const Geometry<int64_t>& geo, const GridStrides& strides, const T* go, const T* x, const T* mul,
                    int64_t mul_batch_stride, T* gh, int64_t row0, int64_t row1) {
  with_flags(mul != nullptr, [&]<bool kMul>() {
    grad_attn_rows_impl<T, kMul>(geo, strides, go, x, mul, mul_batch_stride, gh, row0, row1);
  });
}

template <typename T>
void grad_ghost_rows(const Geometry<int64_t>& geo, const GridStrides& strides, const T* go, const T* x, const T* h,
                     T* gm, T* ga, int64_t b, int64_t row0, int64_t row1) {
  with_flags(gm != nullptr, ga != nullptr, [&]<bool kMul, bool kAdd>() {
    // Neither gradient asked for: nothing to add.
    if constexpr (kMul || kAdd) grad_ghost_rows_impl<T, kMul, kAdd>(geo, strides, go, x, h, gm, ga, b, row0, row1);
  });
}

template <typename T>
constexpr Kernels<T> make_kernels() {
  return Kernels<T>{&forward_rows<T>, &grad_features_rows<T>, &grad_attn_rows<T>, &grad_ghost_rows<T>};
}
