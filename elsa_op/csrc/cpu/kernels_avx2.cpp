// The kernels for CPUs with AVX2 and FMA: 32-byte vectors. Everything this file defines is
// compiled for AVX2 and called only after selected_kernels<T>() has checked the CPU (see dispatch.cpp).
// kernels.h comes before the switch of instruction set, so that its inline code (and geometry.h's), of
// which the linker keeps one copy for both builds, stays baseline code.
#include "kernels.h"

#if defined(ELSA_HAVE_AVX2_KERNELS)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace elsa_op::cpu::isa_avx2 {

#define ELSA_VECTOR_BYTES 32
#include "kernels_impl.h"

const Kernels<float> kernels_float = make_kernels<float>();
const Kernels<double> kernels_double = make_kernels<double>();

}  // namespace elsa_op::cpu::isa_avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif
