#pragma once
// The Adam/AdamW update of one element, or one vector of elements, shared by the CPU kernels
// (vector body and scalar tail) and the CUDA kernel: torch.optim.Adam's single-tensor
// implementation, operation by operation and in its order (contract: pyeff/ops/adam.py). Each line
// names the torch operation it mirrors. Compiled without FMA contraction everywhere (setup.py), so
// every backend rounds the same operations.
#include "math_ops.h"

namespace pyeff {

// One call's hyper-parameters (the op's arguments; lr may come from a tensor, see adam_coef).
struct AdamHyper {
  double beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled_weight_decay, has_grad_mult;
};

// One tensor's coefficients in the math type (T: Acc, or a vector of Acc).
template <typename T>
struct AdamCoef {
  T lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay, neg_step_size, bc2_sqrt, grad_mult;
};

// `step` is the tensor's step count after the increment. The bias corrections are computed in
// double, as torch.optim computes them from Python floats, and every coefficient is rounded to the
// math type once, as torch does when it applies a Python float to a tensor.
template <typename T, typename Acc>
C10_HOST_DEVICE inline AdamCoef<T> adam_coef(const AdamHyper& h, double lr, double step, Acc grad_mult) {
  const double step_size = lr / (1 - ::pow(h.beta1, step));   // lr / bias_correction1
  const double bc2_sqrt = ::sqrt(1 - ::pow(h.beta2, step));   // bias_correction2 ** 0.5
  return {T(Acc(1 - h.beta1)), T(Acc(h.beta2)),        T(Acc(1 - h.beta2)),
          T(Acc(h.eps)),       T(Acc(h.weight_decay)), T(Acc(1 - lr * h.weight_decay)),
          T(Acc(-step_size)),  T(Acc(bc2_sqrt)),       T(grad_mult)};
}

// p is the parameter (or its fp32 master copy), g its gradient, m / v / vmax the moments.
template <typename T>
C10_HOST_DEVICE inline void adam_math(const AdamHyper& h, const AdamCoef<T>& c, T& p, T g, T& m, T& v, T& vmax) {
  using Ops = MathOps<T>;
  if (h.has_grad_mult) g = g * c.grad_mult;      // unscale and clip (NOTE [mixed-precision step])
  if (h.maximize) g = Ops::neg(g);
  if (h.weight_decay != 0) {
    if (h.decoupled_weight_decay) {
      p = p * c.decay;                            // param.mul_(1 - lr * weight_decay)
    } else {
      g = g + c.weight_decay * p;                 // grad = grad.add(param, alpha=weight_decay)
    }
  }
  m = m + c.lerp_weight * (g - m);                // exp_avg.lerp_(grad, 1 - beta1)
  v = v * c.beta2 + c.one_minus_beta2 * g * g;    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  T second = v;
  if (h.amsgrad) {
    vmax = Ops::maximum(vmax, v);                 // torch.maximum(max_exp_avg_sq, exp_avg_sq)
    second = vmax;
  }
  const T denom = Ops::sqrt(second) / c.bc2_sqrt + c.eps;  // (sqrt / bias_correction2_sqrt).add_(eps)
  p = p + c.neg_step_size * m / denom;            // param.addcdiv_(exp_avg, denom, value=-step_size)
}

}  // namespace pyeff
