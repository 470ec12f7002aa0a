// Adam / AdamW on the CPU: one parallel region over every tensor of a call, at::vec in the body,
// a scalar tail with the same operations in the same order (results do not depend on where a
// thread's range starts). Math order mirrors torch.optim.Adam's single-tensor implementation.
#include "cpu/adam_kernel.h"
#include "cpu/param_io.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

template <typename T>  // T: Vectorized<Acc> in the body, Acc in the tail
struct AdamCoef {
  T lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay, neg_step_size, bc2_sqrt, grad_mult;
};

template <typename T, typename Acc>
AdamCoef<T> make_coef(const AdamArgs& a, const AdamTensor& t) {
  // Scalars are rounded to the math type once, as torch does when it applies a Python float to a tensor.
  return {T(Acc(1 - a.beta1)),   T(Acc(a.beta2)),        T(Acc(1 - a.beta2)),
          T(Acc(a.eps)),         T(Acc(a.weight_decay)), T(Acc(1 - a.lr * a.weight_decay)),
          T(Acc(-t.step_size)),  T(Acc(t.bias_correction2_sqrt)), T(Acc(a.grad_mult))};
}

template <typename T> inline T neg(const T& x) { return -x; }
template <typename T> inline Vectorized<T> neg(const Vectorized<T>& x) { return x.neg(); }

// One element (or one vector of elements) of the update. p is the parameter (or its master copy).
template <typename T>
inline void adam_math(const AdamArgs& a, const AdamCoef<T>& c, T& p, T g, T& m, T& v, T& vmax) {
  if (a.has_grad_mult) g = g * c.grad_mult;
  if (a.maximize) g = neg(g);
  if (a.weight_decay != 0) {
    if (a.decoupled_weight_decay) {
      p = p * c.decay;                            // param.mul_(1 - lr * weight_decay)
    } else {
      g = g + c.weight_decay * p;                 // grad = grad.add(param, alpha=weight_decay)
    }
  }
  m = m + c.lerp_weight * (g - m);                // exp_avg.lerp_(grad, 1 - beta1)
  v = v * c.beta2 + c.one_minus_beta2 * g * g;    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  T second = v;
  if (a.amsgrad) {
    vmax = vmaximum(vmax, v);                     // torch.maximum(max_exp_avg_sq, exp_avg_sq)
    second = vmax;
  }
  const T denom = vsqrt(second) / c.bc2_sqrt + c.eps;  // (sqrt / bias_correction2_sqrt).add_(eps)
  p = p + c.neg_step_size * m / denom;            // param.addcdiv_(exp_avg, denom, value=-step_size)
}

// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE.
template <typename P, typename G, PrecisionMode MODE>
void adam_span(const AdamArgs& a, const AdamTensor& t, int64_t lo, int64_t hi) {
  using Acc = opmath_t<P>;
  using M = std::conditional_t<MODE == PrecisionMode::MASTER, float, P>;  // moment storage
  using V = Vectorized<Acc>;
  constexpr int64_t kBlock = block_size<Acc>();

  const ParamIo<P, MODE> param{static_cast<P*>(t.param), t.master, static_cast<P*>(t.compensation)};
  auto* grad = static_cast<const G*>(t.grad);
  auto* exp_avg = static_cast<M*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<M*>(t.exp_avg_sq);
  auto* max_sq = static_cast<M*>(t.max_exp_avg_sq);
  const AdamCoef<V> cv = make_coef<V, Acc>(a, t);
  const AdamCoef<Acc> cs = make_coef<Acc, Acc>(a, t);

  int64_t i = lo;
  for (; i + kBlock <= hi; i += kBlock) {
    V p[2], g[2], m[2], v[2], x[2];
    param.load(i, p[0], p[1]);
    Io<G>::load(grad + i, g[0], g[1]);
    Io<M>::load(exp_avg + i, m[0], m[1]);
    Io<M>::load(exp_avg_sq + i, v[0], v[1]);
    if (a.amsgrad) Io<M>::load(max_sq + i, x[0], x[1]);
    const V old[2] = {p[0], p[1]};
    for (int k = 0; k < 2; ++k) adam_math(a, cv, p[k], g[k], m[k], v[k], x[k]);
    Io<M>::store(exp_avg + i, m[0], m[1]);
    Io<M>::store(exp_avg_sq + i, v[0], v[1]);
    if (a.amsgrad) Io<M>::store(max_sq + i, x[0], x[1]);
    param.store(i, p, old);
  }
  for (; i < hi; ++i) {
    Acc p = param.load1(i);
    const Acc old = p;
    Acc m = Io<M>::load1(exp_avg + i);
    Acc v = Io<M>::load1(exp_avg_sq + i);
    Acc x = a.amsgrad ? Io<M>::load1(max_sq + i) : Acc(0);
    adam_math(a, cs, p, Acc(Io<G>::load1(grad + i)), m, v, x);
    Io<M>::store1(exp_avg + i, m);
    Io<M>::store1(exp_avg_sq + i, v);
    if (a.amsgrad) Io<M>::store1(max_sq + i, x);
    param.store1(i, p, old);
  }
}

template <typename P, PrecisionMode MODE>
void run(const AdamArgs& a) {
  with_grad_type<P>(a.grad_dtype, [&](auto grad_tag) {
    using G = typename decltype(grad_tag)::type;
    for_each_span(a.offsets, [&](int64_t t, int64_t lo, int64_t hi) { adam_span<P, G, MODE>(a, a.tensors[t], lo, hi); });
  });
}

template <typename P>
void run_low_precision(const AdamArgs& a) {
  switch (a.mode) {
    case PrecisionMode::MASTER: return run<P, PrecisionMode::MASTER>(a);
    case PrecisionMode::KAHAN: return run<P, PrecisionMode::KAHAN>(a);
    default: return run<P, PrecisionMode::PLAIN>(a);
  }
}

}  // namespace

void adam_kernel(const AdamArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return run<float, PrecisionMode::PLAIN>(a);
    case c10::ScalarType::Double: return run<double, PrecisionMode::PLAIN>(a);
    case c10::ScalarType::BFloat16: return run_low_precision<c10::BFloat16>(a);
    case c10::ScalarType::Half: return run_low_precision<c10::Half>(a);
    default: return;  // csrc/adam.cpp rejects every other dtype before calling
  }
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
