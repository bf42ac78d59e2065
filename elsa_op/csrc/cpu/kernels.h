// CPU kernels of the ELSA operator (channels-last data): the types they share and their tables.
//
// The kernels are written once (kernels_impl.h) over a vector width and compiled once per
// instruction set (kernels_*.cpp); `selected_kernels<T>()` (dispatch.cpp) picks the widest one the CPU
// runs. This header is plain C++ so that nothing here is compiled with another instruction set than the
// caller's.
#pragma once

#include <cstdint>

#include "../geometry.h"

namespace elsa_op::cpu {

// Output positions j in [0, out_size) whose input position j * stride + offset lies inside [0, size),
// as [j0, j1).
inline void valid_columns(int64_t offset, int64_t stride, int64_t size, int64_t out_size, int64_t& j0, int64_t& j1) {
  j0 = offset < 0 ? (-offset + stride - 1) / stride : 0;
  const int64_t last = size - 1 - offset;
  j1 = last < 0 ? 0 : last / stride + 1;
  if (j1 > out_size) j1 = out_size;
  if (j1 < j0) j1 = j0;
}

// The pixel strides of the two grids of one call. Channels are unit-stride in every tensor.
struct GridStrides {
  PixelStrides input;   // the input-resolution tensor: features, or their gradient
  PixelStrides output;  // the output-resolution tensor: the output, or its gradient
};

// Ghost kernels transposed to [K*K, C] per batch element (batch stride 0 when broadcast); null when absent.
template <typename T>
struct Ghost {
  const T* mul;
  int64_t mul_batch_stride;
  const T* add;
  int64_t add_batch_stride;
};

// Each kernel handles a range of rows (b * rows + row) so that callers can split the work across threads.
// Attention is [B, Ho, Wo, G, K*K], contiguous.
template <typename T>
struct Kernels {
  // out[b, i, j, c] = sum_t x[b, i*s + dy_t, j*s + dx_t, c] * (mul[t, c] * h[b, i, j, g(c), t] + add[t, c]).
  void (*forward)(const Geometry<int64_t>&, const GridStrides&, const T* x, const T* h, Ghost<T> ghost, T* out,
                  int64_t row0, int64_t row1);
  // The gradient of features, gathered per input pixel; rows over B * H.
  void (*grad_features)(const Geometry<int64_t>&, const GridStrides&, const T* grad_out, const T* h, Ghost<T> ghost,
                        T* grad_x, int64_t row0, int64_t row1);
  // grad_h[b, i, j, g, t] = sum_{c in g} grad_out[b, i, j, c] * mul[t, c] * x[b, i*s + dy_t, j*s + dx_t, c],
  // written to a contiguous [B, Ho, Wo, G, K*K] tensor; taps outside the image get 0.
  void (*grad_attn)(const Geometry<int64_t>&, const GridStrides&, const T* grad_out, const T* x, const T* mul,
                    int64_t mul_batch_stride, T* grad_h, int64_t row0, int64_t row1);
  // Adds the ghost gradients of output rows [row0, row1) of batch element b to grad_mul and grad_add
  // ([K*K, C] each; either may be null).
  void (*grad_ghost)(const Geometry<int64_t>&, const GridStrides&, const T* grad_out, const T* x, const T* h,
                     T* grad_mul, T* grad_add, int64_t b, int64_t row0, int64_t row1);
};

namespace isa_default {
extern const Kernels<float> kernels_float;
extern const Kernels<double> kernels_double;
}  // namespace isa_default

#if defined(__x86_64__) || defined(_M_X64)
#define ELSA_HAVE_AVX2_KERNELS 1
namespace isa_avx2 {
extern const Kernels<float> kernels_float;
extern const Kernels<double> kernels_double;
}  // namespace isa_avx2
#endif

// The instruction set in use: "avx2" where the CPU has AVX2 and FMA, else "default". ELSA_CPU_CAPABILITY=default
// forces the baseline build (as ATEN_CPU_CAPABILITY does for PyTorch's kernels).
const char* capability();

// The kernels built for that instruction set.
template <typename T>
const Kernels<T>& selected_kernels();

}  // namespace elsa_op::cpu
