// Adagrad on the CPU: one parallel region over every tensor of a call, dense gradients and the
// touched rows of sparse ones alike (NOTE [sparse Adagrad rows]); at::vec in the body, a scalar
// tail with the same operations in the same order (results do not depend on where a thread's
// range or a row starts). Math order mirrors torch.optim.Adagrad's single-tensor implementation.
#include "cpu/adagrad_kernel.h"
#include "cpu/param_io.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

template <typename T>  // T: Vectorized<Acc> in the body, Acc in the tail
struct AdagradCoef {
  T eps, weight_decay, neg_clr, grad_mult;
};

template <typename T, typename Acc>
AdagradCoef<T> make_coef(const AdagradArgs& a, const AdagradTensor& t) {
  // Scalars are rounded to the math type once, as torch does when it applies a Python float to a tensor.
  return {T(Acc(a.eps)), T(Acc(a.weight_decay)), T(Acc(-t.clr)), T(Acc(a.grad_mult))};
}

template <typename T> inline T neg(const T& x) { return -x; }
template <typename T> inline Vectorized<T> neg(const Vectorized<T>& x) { return x.neg(); }

// One element (or one vector of elements) of the update. p is the parameter (or its master copy),
// s its accumulated sum of squares.
template <bool SPARSE, typename T>
inline void adagrad_math(const AdagradArgs& a, const AdagradCoef<T>& c, T& p, T g, T& s) {
  if (a.has_grad_mult) g = g * c.grad_mult;
  if (a.maximize) g = neg(g);                   // grad = -grad
  if (!SPARSE && a.weight_decay != 0) {
    g = g + c.weight_decay * p;                 // grad = grad.add(param, alpha=weight_decay)
  }
  s = s + g * g;                                // state_sum.addcmul_(grad, grad, value=1)
  const T std = vsqrt(s) + c.eps;               // std = state_sum.sqrt().add_(eps)
  if constexpr (SPARSE) {
    p = p + c.neg_clr * (g / std);              // param.add_(sparse(grad_values / std_values), alpha=-clr)
  } else {
    p = p + c.neg_clr * g / std;                // param.addcdiv_(grad, std, value=-clr)
  }
}

// The pointers of one tensor and its coefficients; run() updates n consecutive elements.
// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE.
template <typename P, typename G, PrecisionMode MODE>
struct Span {
  using Acc = opmath_t<P>;
  using S = std::conditional_t<MODE == PrecisionMode::MASTER, float, P>;  // sum storage
  using V = Vectorized<Acc>;
  static constexpr int64_t kBlock = block_size<Acc>();

  const AdagradArgs& a;
  const AdagradCoef<V> cv;
  const AdagradCoef<Acc> cs;
  const ParamIo<P, MODE> param;
  const G* const grad;
  S* const sum;

  Span(const AdagradArgs& args, const AdagradTensor& t)
      : a(args),
        cv(make_coef<V, Acc>(args, t)),
        cs(make_coef<Acc, Acc>(args, t)),
        param{static_cast<P*>(t.param), t.master, static_cast<P*>(t.compensation)},
        grad(static_cast<const G*>(t.grad)),
        sum(static_cast<S*>(t.sum)) {}

  // Elements [at, at + n) of the parameter and its state, with gradient elements [g_at, g_at + n).
  template <bool SPARSE>
  void run(int64_t at, int64_t g_at, int64_t n) const {
    const ParamIo<P, MODE> pp = param.offset(at);
    const G* const gp = grad + g_at;
    S* const sp = sum + at;
    int64_t i = 0;
    for (; i + kBlock <= n; i += kBlock) {
      V p[2], g[2], s[2];
      pp.load(i, p[0], p[1]);
      Io<G>::load(gp + i, g[0], g[1]);
      Io<S>::load(sp + i, s[0], s[1]);
      const V old[2] = {p[0], p[1]};
      for (int k = 0; k < 2; ++k) adagrad_math<SPARSE>(a, cv, p[k], g[k], s[k]);
      Io<S>::store(sp + i, s[0], s[1]);
      pp.store(i, p, old);
    }
    for (; i < n; ++i) {
      Acc p = pp.load1(i);
      const Acc old = p;
      Acc s = Io<S>::load1(sp + i);
      adagrad_math<SPARSE>(a, cs, p, Acc(Io<G>::load1(gp + i)), s);
      Io<S>::store1(sp + i, s);
      pp.store1(i, p, old);
    }
  }
};

template <typename P, typename G, PrecisionMode MODE>
void run_typed(const AdagradArgs& a) {
  for_each_span(a.offsets, [&](int64_t t, int64_t lo, int64_t hi) {
    const AdagradTensor& x = a.tensors[t];
    const Span<P, G, MODE> span(a, x);
    if (x.row_offsets == nullptr) {
      span.template run<false>(lo, lo, hi - lo);
      return;
    }
    // A range of sparse values: cut it at row ends; each piece lands at its row's offset.
    const int64_t rn = x.row_numel;
    int64_t r = lo / rn;
    int64_t col = lo - r * rn;
    while (lo < hi) {
      const int64_t n = std::min(hi - lo, rn - col);
      span.template run<true>(x.row_offsets[r] + col, lo, n);
      lo += n;
      ++r;
      col = 0;
    }
  });
}

template <typename P, PrecisionMode MODE>
void run(const AdagradArgs& a) {
  with_grad_type<P>(a.grad_dtype, [&](auto grad_tag) { run_typed<P, typename decltype(grad_tag)::type, MODE>(a); });
}

template <typename P>
void run_low_precision(const AdagradArgs& a) {
  switch (a.mode) {
    case PrecisionMode::MASTER: return run<P, PrecisionMode::MASTER>(a);
    case PrecisionMode::KAHAN: return run<P, PrecisionMode::KAHAN>(a);
    default: return run<P, PrecisionMode::PLAIN>(a);
  }
}

}  // namespace

void adagrad_kernel(const AdagradArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return run<float, PrecisionMode::PLAIN>(a);
    case c10::ScalarType::Double: return run<double, PrecisionMode::PLAIN>(a);
    case c10::ScalarType::BFloat16: return run_low_precision<c10::BFloat16>(a);
    case c10::ScalarType::Half: return run_low_precision<c10::Half>(a);
    default: return;  // csrc/adagrad.cpp rejects every other dtype before calling
  }
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
