// bias_gelu_{forward,backward} and swiglu_{forward,backward}'s CPU backend: checks and registration
// (as torch.ops.pyeff.<op>.cpu) of the activation kernels (csrc/cpu/activation_kernel.cpp). Contracts and references:
// pyeff/ops/activation.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "checks.h"
#include "cpu/activation_kernel.h"

namespace pyeff {
namespace {

// A contiguous 2-D CPU floating tensor.
void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": expected ", name, " to be 2-D (rows, features), got shape ", t.sizes());
  check_floating(op, t.scalar_type(), name);
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ", t.strides());
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  check_rows(op, name, t);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": expected ", name, " to be ", like.scalar_type(),
              " like the input, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": expected ", name, " of shape ", like.sizes(),
              " like the input, got ", t.sizes());
}

cpu::GeluApproximation approximation(const char* op, c10::string_view approximate) {
  if (approximate == "none") return cpu::GeluApproximation::NONE;
  if (approximate == "tanh") return cpu::GeluApproximation::TANH;
  TORCH_CHECK(false, op, ": expected `approximate` to be 'none' or 'tanh', got '", approximate, "'");
}

// bias: (cols,), the input's dtype or float32 for bfloat16/float16 input. Returns the dtype the
// kernel reads it as.
c10::ScalarType check_bias(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  const auto dt = x.scalar_type();
  if (!bias.has_value()) return dt;
  const auto& b = *bias;
  TORCH_CHECK(b.device().is_cpu(), op, ": expected bias on the CPU, got ", b.device());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == x.size(1), op, ": expected bias of shape [", x.size(1),
              "] (the input's last dimension), got ", b.sizes());
  check_param_dtype(op, "bias", b.scalar_type(), dt);
  TORCH_CHECK(b.is_contiguous(), op, ": expected bias to be contiguous");
  return b.scalar_type();
}

at::Tensor bias_gelu_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                 c10::string_view approximate) {
  constexpr const char* op = "bias_gelu_forward";
  check_rows(op, "x", x);
  const auto bias_dtype = check_bias(op, x, bias);
  const auto approx = approximation(op, approximate);
  auto y = at::empty_like(x);
  cpu::BiasGeluForwardArgs a;
  a.x = x.const_data_ptr();
  a.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.dtype = x.scalar_type();
  a.bias_dtype = bias_dtype;
  a.rows = x.size(0);
  a.cols = x.size(1);
  a.approximate = approx;
  PYEFF_ISA_SELECT(bias_gelu_forward_kernel)(a);
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                          const std::optional<at::Tensor>& bias,
                                                          c10::string_view approximate, bool bias_grad) {
  constexpr const char* op = "bias_gelu_backward";
  check_rows(op, "x", x);
  check_like(op, "dy", dy, x);
  const auto bias_dtype = check_bias(op, x, bias);
  const auto approx = approximation(op, approximate);
  TORCH_CHECK(bias.has_value() || !bias_grad, op, ": `bias_grad=True` needs the `bias`");
  auto dx = at::empty_like(x);
  auto dbias = at::empty({bias_grad ? x.size(1) : 0}, x.options().dtype(bias_dtype));
  cpu::BiasGeluBackwardArgs a;
  a.dy = dy.const_data_ptr();
  a.x = x.const_data_ptr();
  a.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  a.dx = dx.data_ptr();
  a.dbias = bias_grad ? dbias.data_ptr() : nullptr;
  a.dtype = x.scalar_type();
  a.bias_dtype = bias_dtype;
  a.rows = x.size(0);
  a.cols = x.size(1);
  a.approximate = approx;
  PYEFF_ISA_SELECT(bias_gelu_backward_kernel)(a);
  return {dx, dbias};
}

// gate and up as the kernel reads them: two (rows, cols) arrays with their row strides. Without
// `up`, `gate` is (rows, 2 * cols): gate = its first half, up = its second half.
struct SwigluInputs {
  const void* gate;
  const void* up;
  int64_t gate_stride, up_stride, rows, cols;
};

SwigluInputs swiglu_inputs(const char* op, const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  check_rows(op, "gate", gate);
  if (up.has_value()) {
    check_like(op, "up", *up, gate);
    return {gate.const_data_ptr(), up->const_data_ptr(), gate.size(1), gate.size(1), gate.size(0), gate.size(1)};
  }
  TORCH_CHECK(gate.size(1) % 2 == 0, op, ": without `up`, expected gate's last dimension to be even "
              "(gate and up packed), got ", gate.size(1));
  const int64_t cols = gate.size(1) / 2;
  const char* base = static_cast<const char*>(gate.const_data_ptr());
  return {base, base + cols * gate.element_size(), gate.size(1), gate.size(1), gate.size(0), cols};
}

at::Tensor swiglu_forward_cpu(const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  constexpr const char* op = "swiglu_forward";
  const auto in = swiglu_inputs(op, gate, up);
  auto y = at::empty({in.rows, in.cols}, gate.options());
  cpu::SwigluForwardArgs a;
  a.gate = in.gate;
  a.up = in.up;
  a.y = y.data_ptr();
  a.gate_stride = in.gate_stride;
  a.up_stride = in.up_stride;
  a.dtype = gate.scalar_type();
  a.rows = in.rows;
  a.cols = in.cols;
  PYEFF_ISA_SELECT(swiglu_forward_kernel)(a);
  return y;
}

// Returns [dgate | dup] packed as (rows, 2 * cols), whichever form the input had.
at::Tensor swiglu_backward_cpu(const at::Tensor& dy, const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  constexpr const char* op = "swiglu_backward";
  const auto in = swiglu_inputs(op, gate, up);
  check_rows(op, "dy", dy);
  TORCH_CHECK(dy.scalar_type() == gate.scalar_type(), op, ": expected dy to be ", gate.scalar_type(),
              " like the input, got ", dy.scalar_type());
  TORCH_CHECK(dy.size(0) == in.rows && dy.size(1) == in.cols, op, ": expected dy of shape [", in.rows, ", ",
              in.cols, "] like the output, got ", dy.sizes());
  auto dgrad = at::empty({in.rows, 2 * in.cols}, gate.options());
  char* base = static_cast<char*>(dgrad.data_ptr());
  cpu::SwigluBackwardArgs a;
  a.dy = dy.const_data_ptr();
  a.gate = in.gate;
  a.up = in.up;
  a.dgate = base;
  a.dup = base + in.cols * dgrad.element_size();
  a.gate_stride = in.gate_stride;
  a.up_stride = in.up_stride;
  a.grad_stride = 2 * in.cols;
  a.dtype = gate.scalar_type();
  a.rows = in.rows;
  a.cols = in.cols;
  PYEFF_ISA_SELECT(swiglu_backward_kernel)(a);
  return dgrad;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) {
  m.impl("bias_gelu_forward.cpu", &bias_gelu_forward_cpu);
  m.impl("bias_gelu_backward.cpu", &bias_gelu_backward_cpu);
  m.impl("swiglu_forward.cpu", &swiglu_forward_cpu);
  m.impl("swiglu_backward.cpu", &swiglu_backward_cpu);
}

}  // namespace pyeff
