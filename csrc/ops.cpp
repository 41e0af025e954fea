// Schemas of every fastseg op. Kernels register per dispatch key in csrc/cpu and csrc/cuda;
// fake implementations and autograd are attached from Python (fastseg/ops).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastseg._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(fastseg, m) {
  m.def("mixed_depthwise_conv2d(Tensor x, Tensor[] weights, Tensor? bias, bool residual) -> Tensor");
  m.def(
      "mixed_depthwise_conv2d_backward(Tensor grad_out, Tensor x, Tensor[] weights, bool residual)"
      " -> (Tensor, Tensor[], Tensor)");
  m.def(
      "dynamic_conv2d(Tensor x, Tensor experts, Tensor routing, Tensor? bias, int[2] stride,"
      " int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "dynamic_conv2d_backward(Tensor grad_out, Tensor x, Tensor experts, Tensor routing,"
      " Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dilated_attention2d(Tensor q, Tensor k, Tensor v, int dilation, float scale) -> (Tensor, Tensor)");
  m.def(
      "dilated_attention2d_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
      " Tensor lse, int dilation, float scale) -> (Tensor, Tensor, Tensor)");
}
