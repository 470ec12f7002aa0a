// Adagrad on the CPU: one parallel region over every tensor of a call, dense gradients and the
// touched rows of sparse ones alike (NOTE [sparse Adagrad rows]); at::vec in the body, a scalar
// tail with the same operations in the same order (csrc/adagrad_math.h), so results do not depend
// on where a thread's range or a row starts.
#include "cpu/adagrad_kernel.h"
#include "cpu/param_io.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

// The pointers of one tensor and its coefficients; run() updates n consecutive elements.
// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE.
template <typename P, typename G, PrecisionMode MODE>
struct Span {
  using Acc = opmath_t<P>;
  using S = state_t<P, MODE>;  // sum storage
  using V = Vectorized<Acc>;
  static constexpr int64_t kBlock = block_size<Acc>();

  const AdagradHyper& h;
  const AdagradCoef<V> cv;
  const AdagradCoef<Acc> cs;
  const ParamIo<P, MODE> param;
  const G* const grad;
  S* const sum;

  Span(const AdagradArgs& args, const AdagradTensor& t)
      : h(args.hyper),
        cv(adagrad_coef<V, Acc>(args.hyper, args.lr, t.step, Acc(args.grad_mult))),
        cs(adagrad_coef<Acc, Acc>(args.hyper, args.lr, t.step, Acc(args.grad_mult))),
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
      for (int k = 0; k < 2; ++k) adagrad_math<SPARSE>(h, cv, p[k], g[k], s[k]);
      Io<S>::store(sp + i, s[0], s[1]);
      pp.store(i, p, old);
    }
    for (; i < n; ++i) {
      Acc p = pp.load1(i);
      const Acc old = p;
      Acc s = Io<S>::load1(sp + i);
      adagrad_math<SPARSE>(h, cs, p, Acc(Io<G>::load1(gp + i)), s);
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

}  // namespace

void adagrad_kernel(const AdagradArgs& a) {
  dispatch_optimizer_types(a.dtype, a.grad_dtype, a.mode, [&](auto p, auto g, auto mode) {
    run_typed<typename decltype(p)::type, typename decltype(g)::type, decltype(mode)::value>(a);
  });
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
