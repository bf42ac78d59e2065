// The kernels for the x86-64 baseline (SSE2; NEON on Arm): 16-byte vectors.
#include "kernels.h"

namespace elsa_op::cpu::isa_default {

#define ELSA_VECTOR_BYTES 16
#include "kernels_impl.h"

const Kernels<float> kernels_float = make_kernels<float>();
const Kernels<double> kernels_double = make_kernels<double>();

}  // namespace elsa_op::cpu::isa_default
