// Picks the kernels built for the widest instruction set this CPU runs.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace elsa_op::cpu {
namespace {

bool use_avx2() {
#if defined(ELSA_HAVE_AVX2_KERNELS)
  static const bool chosen = [] {
    const char* forced = std::getenv("ELSA_CPU_CAPABILITY");
    if (forced != nullptr && std::strcmp(forced, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return chosen;
#else
  return false;
#endif
}

}  // namespace

const char* capability() {
  return use_avx2() ? "avx2" : "default";
}

template <>
const Kernels<float>& selected_kernels<float>() {
#if defined(ELSA_HAVE_AVX2_KERNELS)
  if (use_avx2()) return isa_avx2::kernels_float;
#endif
  return isa_default::kernels_float;
}

template <>
const Kernels<double>& selected_kernels<double>() {
#if defined(ELSA_HAVE_AVX2_KERNELS)
  if (use_avx2()) return isa_avx2::kernels_double;
#endif
  return isa_default::kernels_double;
}

}  // namespace elsa_op::cpu
