#pragma once
// The SGD update of one element, or one vector of elements, shared by the CPU kernels (vector body
// and scalar tail) and the CUDA kernel: torch.optim.SGD's single-tensor implementation, operation
// by operation and in its order (contract: pyeff/ops/sgd.py), one rounding per operation (torch's
// add_ with alpha may contract a multiply-add into one).
#include "math_ops.h"

namespace pyeff {

struct SgdHyper {
  double momentum, dampening, weight_decay;
  bool nesterov, maximize, has_grad_mult;
};

// One call's coefficients in the math type (T: Acc, or a vector of Acc), each a double rounded
// once, as torch does when it applies a Python float to a tensor.
template <typename T>
struct SgdCoef {
  T momentum, one_minus_dampening, weight_decay, neg_lr, grad_mult;
};

template <typename T, typename Acc>
C10_HOST_DEVICE inline SgdCoef<T> sgd_coef(const SgdHyper& h, double lr, Acc grad_mult) {
  return {T(Acc(h.momentum)), T(Acc(1 - h.dampening)), T(Acc(h.weight_decay)), T(Acc(-lr)), T(grad_mult)};
}

// p is the parameter (or its fp32 master copy), g its gradient, buf its momentum buffer (not read
// on the parameter's first step, when it is created from the gradient; unused without momentum).
template <typename T>
C10_HOST_DEVICE inline void sgd_math(const SgdHyper& h, const SgdCoef<T>& c, bool first_step, T& p, T g, T& buf) {
  using Ops = MathOps<T>;
  if (h.has_grad_mult) g = g * c.grad_mult;     // unscale and clip (NOTE [mixed-precision step])
  if (h.maximize) g = Ops::neg(g);              // grad = -grad
  if (h.weight_decay != 0) {
    g = g + c.weight_decay * p;                 // grad = grad.add(param, alpha=weight_decay)
  }
  if (h.momentum != 0) {
    if (first_step) {
      buf = g;                                  // buf = grad.detach().clone()
    } else {
      buf = buf * c.momentum + c.one_minus_dampening * g;  // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
    }
    if (h.nesterov) {
      g = g + c.momentum * buf;                 // grad = grad.add(buf, alpha=momentum)
    } else {
      g = buf;                                  // grad = buf
    }
  }
  p = p + c.neg_lr * g;                         // param.add_(grad, alpha=-lr)
}

}  // namespace pyeff
