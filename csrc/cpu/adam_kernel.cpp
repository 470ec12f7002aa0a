// Adam / AdamW on the CPU: one parallel region over every tensor of a call, at::vec in the body,
// a scalar tail with the same operations in the same order (csrc/adam_math.h), so results do not
// depend on where a thread's range starts.
#include "cpu/adam_kernel.h"
#include "cpu/param_io.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE.
template <typename P, typename G, PrecisionMode MODE>
void adam_span(const AdamArgs& a, const AdamTensor& t, int64_t lo, int64_t hi) {
  using Acc = opmath_t<P>;
  using M = state_t<P, MODE>;  // moment storage
  using V = Vectorized<Acc>;
  constexpr int64_t kBlock = block_size<Acc>();

  const ParamIo<P, MODE> param{static_cast<P*>(t.param), t.master, static_cast<P*>(t.compensation)};
  auto* grad = static_cast<const G*>(t.grad);
  auto* exp_avg = static_cast<M*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<M*>(t.exp_avg_sq);
  auto* max_sq = static_cast<M*>(t.max_exp_avg_sq);
  const auto cs = adam_coef<Acc, Acc>(a.hyper, a.lr, t.step, Acc(a.grad_mult));
  const auto cv = adam_coef<V, Acc>(a.hyper, a.lr, t.step, Acc(a.grad_mult));
  const bool amsgrad = a.hyper.amsgrad;

  int64_t i = lo;
  for (; i + kBlock <= hi; i += kBlock) {
    V p[2], g[2], m[2], v[2], x[2];
    param.load(i, p[0], p[1]);
    Io<G>::load(grad + i, g[0], g[1]);
    Io<M>::load(exp_avg + i, m[0], m[1]);
    Io<M>::load(exp_avg_sq + i, v[0], v[1]);
    if (amsgrad) Io<M>::load(max_sq + i, x[0], x[1]);
    const V old[2] = {p[0], p[1]};
    for (int k = 0; k < 2; ++k) adam_math(a.hyper, cv, p[k], g[k], m[k], v[k], x[k]);
    Io<M>::store(exp_avg + i, m[0], m[1]);
    Io<M>::store(exp_avg_sq + i, v[0], v[1]);
    if (amsgrad) Io<M>::store(max_sq + i, x[0], x[1]);
    param.store(i, p, old);
  }
  for (; i < hi; ++i) {
    Acc p = param.load1(i);
    const Acc old = p;
    Acc m = Io<M>::load1(exp_avg + i);
    Acc v = Io<M>::load1(exp_avg_sq + i);
    Acc x = amsgrad ? Io<M>::load1(max_sq + i) : Acc(0);
    adam_math(a.hyper, cs, p, Acc(Io<G>::load1(grad + i)), m, v, x);
    Io<M>::store1(exp_avg + i, m);
    Io<M>::store1(exp_avg_sq + i, v);
    if (amsgrad) Io<M>::store1(max_sq + i, x);
    param.store1(i, p, old);
  }
}

template <typename P, typename G, PrecisionMode MODE>
void run(const AdamArgs& a) {
  for_each_span(a.offsets, [&](int64_t t, int64_t lo, int64_t hi) { adam_span<P, G, MODE>(a, a.tensors[t], lo, hi); });
}

}  // namespace

void adam_kernel(const AdamArgs& a) {
  dispatch_optimizer_types(a.dtype, a.grad_dtype, a.mode, [&](auto p, auto g, auto mode) {
    run<typename decltype(p)::type, typename decltype(g)::type, decltype(mode)::value>(a);
  });
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
