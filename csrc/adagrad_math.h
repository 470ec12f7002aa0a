#pragma once
// The Adagrad update of one element, or one vector of elements, shared by the CPU kernels (vector
// body and scalar tail) and the CUDA kernel: torch.optim.Adagrad's single-tensor implementation,
// operation by operation and in its order (contract: pyeff/ops/adagrad.py), one rounding per
// operation (torch's own fused ops may contract a multiply-add into one).
#include "math_ops.h"

namespace pyeff {

struct AdagradHyper {
  double lr_decay, eps, weight_decay;
  bool maximize, has_grad_mult;
};

template <typename T>
struct AdagradCoef {
  T eps, weight_decay, neg_clr, grad_mult;
};

// `step` is the tensor's step count after the increment; clr = lr / (1 + (step - 1) * lr_decay)
// in double, rounded once to the math type.
template <typename T, typename Acc>
C10_HOST_DEVICE inline AdagradCoef<T> adagrad_coef(const AdagradHyper& h, double lr, double step, Acc grad_mult) {
  const double clr = lr / (1 + (step - 1) * h.lr_decay);
  return {T(Acc(h.eps)), T(Acc(h.weight_decay)), T(Acc(-clr)), T(grad_mult)};
}

// p is the parameter (or its fp32 master copy), s its accumulated sum of squares. SPARSE: g is a
// value of a coalesced sparse gradient (no weight decay; torch's sparse update order).
template <bool SPARSE, typename T>
C10_HOST_DEVICE inline void adagrad_math(const AdagradHyper& h, const AdagradCoef<T>& c, T& p, T g, T& s) {
  using Ops = MathOps<T>;
  if (h.has_grad_mult) g = g * c.grad_mult;     // unscale and clip (NOTE [mixed-precision step])
  if (h.maximize) g = Ops::neg(g);              // grad = -grad
  if (!SPARSE && h.weight_decay != 0) {
    g = g + c.weight_decay * p;                 // grad = grad.add(param, alpha=weight_decay)
  }
  s = s + g * g;                                // state_sum.addcmul_(grad, grad, value=1)
  const T std = Ops::sqrt(s) + c.eps;           // std = state_sum.sqrt().add_(eps)
  if constexpr (SPARSE) {
    p = p + c.neg_clr * (g / std);              // param.add_(sparse(grad_values / std_values), alpha=-clr)
  } else {
    p = p + c.neg_clr * g / std;                // param.addcdiv_(grad, std, value=-clr)
  }
}

}  // namespace pyeff
