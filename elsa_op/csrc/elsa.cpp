// Schema of the ELSA operator. Kernels live in cpu/ and cuda/; fake (meta) kernels and autograd are
// registered from Python (elsa_op/ops.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/nhwc_kernels.h"

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
  m.def(
      "elsa_backward_attn(Tensor grad_out, Tensor features, Tensor? ghost_mul, int groups, int kernel_size, "
      "int dilation, int stride) -> Tensor");
  // Returns (grad_ghost_mul, grad_ghost_add); one not asked for is an empty tensor. h_attn is read only
  // for grad_ghost_mul.
  m.def(
      "elsa_backward_ghost(Tensor grad_out, Tensor features, Tensor? h_attn, int groups, int kernel_size, "
      "int dilation, int stride, bool batched, bool need_mul, bool need_add) -> (Tensor, Tensor)");
  // Which build of the channels-last CPU kernels runs: "avx2" or "default" (see cpu/nhwc_kernels.h).
  m.def("cpu_capability() -> str", [] { return std::string(elsa_op::nhwc::cpu_capability()); });
}
