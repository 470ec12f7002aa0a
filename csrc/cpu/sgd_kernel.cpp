// SGD on the CPU: one parallel region over every tensor of a call, at::vec in the body, a scalar
// tail with the same operations in the same order (csrc/sgd_math.h), so results do not depend on
// where a thread's range starts.
#include "cpu/param_io.h"
#include "cpu/sgd_kernel.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE.
template <typename P, typename G, PrecisionMode MODE>
void sgd_span(const SgdArgs& a, const SgdTensor& t, int64_t lo, int64_t hi) {
  using Acc = opmath_t<P>;
  using B = state_t<P, MODE>;  // momentum buffer storage
  using V = Vectorized<Acc>;
  constexpr int64_t kBlock = block_size<Acc>();

  const ParamIo<P, MODE> param{static_cast<P*>(t.param), t.master, static_cast<P*>(t.compensation)};
  auto* grad = static_cast<const G*>(t.grad);
  auto* buf = static_cast<B*>(t.momentum_buffer);
  const auto cs = sgd_coef<Acc, Acc>(a.hyper, a.lr, Acc(a.grad_mult));
  const auto cv = sgd_coef<V, Acc>(a.hyper, a.lr, Acc(a.grad_mult));
  const bool reads_buf = a.hyper.momentum != 0 && !t.first_step;
  const bool writes_buf = a.hyper.momentum != 0;

  int64_t i = lo;
  for (; i + kBlock <= hi; i += kBlock) {
    V p[2], g[2], b[2] = {V(0), V(0)};
    param.load(i, p[0], p[1]);
    Io<G>::load(grad + i, g[0], g[1]);
    if (reads_buf) Io<B>::load(buf + i, b[0], b[1]);
    const V old[2] = {p[0], p[1]};
    for (int k = 0; k < 2; ++k) sgd_math(a.hyper, cv, t.first_step, p[k], g[k], b[k]);
    if (writes_buf) Io<B>::store(buf + i, b[0], b[1]);
    param.store(i, p, old);
  }
  for (; i < hi; ++i) {
    Acc p = param.load1(i);
    const Acc old = p;
    Acc b = reads_buf ? Io<B>::load1(buf + i) : Acc(0);
    sgd_math(a.hyper, cs, t.first_step, p, Acc(Io<G>::load1(grad + i)), b);
    if (writes_buf) Io<B>::store1(buf + i, b);
    param.store1(i, p, old);
  }
}

template <typename P, typename G, PrecisionMode MODE>
void run(const SgdArgs& a, TypeTag<P>, TypeTag<G>, ModeTag<MODE>) {
  for_each_span(a.offsets, [&](int64_t t, int64_t lo, int64_t hi) { sgd_span<P, G, MODE>(a, a.tensors[t], lo, hi); });
}

}  // namespace

void sgd_kernel(const SgdArgs& a) {
  dispatch_optimizer_types(a.dtype, a.grad_dtype, a.mode, [&](auto... types) { run(a, types...); });
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
