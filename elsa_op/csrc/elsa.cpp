// Schema of the ELSA operator. Kernels live in cpu/ and cuda/; fake (meta) kernels and autograd are
// registered from Python (elsa_op/_registration.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"

extern "C" {
// Lets `import elsa_op._C` load this library, whose only job is to run the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(elsa_op, m) {
  m.def(
      "elsa_forward(Tensor features, Tensor h_attn, Tensor? ghost_mul, Tensor? ghost_add, int kernel_size, "
      "int dilation, int stride) -> Tensor");
  m.def(
      "elsa_backward_features(Tensor grad_out, Tensor h_attn, Tensor? ghost_mul, Tensor? ghost_add, "
      "int height, int width, int kernel_size, int dilation, int stride) -> Tensor");
  // Gradients of the attention (weighted by ghost_mul), of ghost_mul (reads h_attn) and of ghost_add, from one
  // pass over grad_out and the features. Ghost gradients are in the accumulation type (float32 for half and
  // bfloat16 features); one not asked for is an empty tensor.
  m.def(
      "elsa_backward_attn_ghost(Tensor grad_out, Tensor features, Tensor? h_attn, Tensor? ghost_mul, int groups, "
      "int kernel_size, int dilation, int stride, bool need_attn, bool need_mul, bool need_add, bool mul_batched, "
      "bool add_batched) -> (Tensor, Tensor, Tensor)");
  // Which build of the CPU kernels runs: "avx2" or "default" (see cpu/kernels.h).
  m.def("cpu_capability() -> str", [] { return std::string(elsa_op::cpu::capability()); });
}
