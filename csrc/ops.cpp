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
  // BatchNorm fused with the activations before (pre) and after (act) it (CPU only;
  // fastseg/ops/norm_act.py).
  m.def(
      "batch_norm_act(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var,"
      " bool training, float eps, int act, float slope, int pre) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor mean,"
      " Tensor var, bool training, float eps, int act, float slope, int pre)"
      " -> (Tensor, Tensor, Tensor)");
  // 2×2 max pooling, stride 2, with the winning window position kept as one byte (CPU only;
  // fastseg/ops/pool.py).
  m.def("max_pool2x2(Tensor x) -> (Tensor, Tensor)");
  m.def("max_pool2x2_backward(Tensor grad_out, Tensor index, int[] x_size) -> Tensor");
  // 1×1 convolution of NCHW tensors, register-blocked (CPU only; fastseg/ops/pointwise.py).
  m.def("pointwise_conv2d(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("pointwise_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight) -> (Tensor, Tensor, Tensor)");
  // Attention gates (fastseg/ops/attention_gates.py holds the same schemas for the Triton ops).
  m.def("spatial_gate(Tensor x, Tensor w, Tensor b) -> Tensor");
  m.def("spatial_gate_backward(Tensor grad_out, Tensor x, Tensor w, Tensor b) -> (Tensor, Tensor, Tensor)");
  m.def("gated_pointwise(Tensor a, Tensor w_s, Tensor b_s, Tensor w_a, Tensor w_b, Tensor bias) -> Tensor");
  m.def(
      "gated_pointwise_backward(Tensor grad_out, Tensor a, Tensor w_s, Tensor b_s, Tensor w_a,"
      " Tensor w_b) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("channel_gate(Tensor x, Tensor w1, Tensor w2, Tensor? skip, bool upsample) -> Tensor");
  m.def(
      "channel_gate_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, bool upsample)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("cross_gate(Tensor a, Tensor b, bool align_corners) -> Tensor");
  m.def("cross_gate_backward(Tensor grad_out, Tensor a, Tensor b, bool align_corners) -> (Tensor, Tensor)");
  m.def("attention_gate(Tensor x, Tensor g, Tensor w_x, Tensor w_g, Tensor b, Tensor psi_w, Tensor psi_b) -> Tensor");
  m.def(
      "attention_gate_backward(Tensor grad_out, Tensor x, Tensor g, Tensor w_x, Tensor w_g, Tensor b,"
      " Tensor psi_w, Tensor psi_b) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
