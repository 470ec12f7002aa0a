// Adagrad on the CPU: one parallel region over every tensor of a call, dense gradients and the
// touched rows of sparse ones alike (NOTE [sparse Adagrad rows]); at::vec in the body, a scalar
// tail with the same operations in the same order (csrc/adagrad_math.h), so results do not depend
// on where a thread's range or a row starts. Sums stored as uint8 codes, or rounded stochastically,
// take the run path of csrc/cpu/state_io.h (NOTE [compressed optimizer state]).
#include "cpu/adagrad_kernel.h"
#include "cpu/param_io.h"
#include "cpu/state_io.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

// The pointers of one tensor and its coefficients; run() updates n consecutive elements.
// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE, sum storage S.
template <typename P, typename G, PrecisionMode MODE, typename S>
struct Span {
  using Acc = opmath_t<P>;
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

// The run path (codes, stochastic rounding): runs of up to kQuantBlock elements (whole blocks for
// codes) of the parameter from `at`, with gradient elements from `g_at`, loaded into fp32 arrays,
// updated with the same vector body and scalar tail, and stored (random word 0: the sum in its low
// half, the parameter in its high half).
template <typename P, typename G, PrecisionMode MODE, typename S>
struct Runs {
  using V = Vectorized<float>;
  static constexpr int64_t kBlock = block_size<float>();

  const AdagradHyper& h;
  const AdagradCoef<V> cv;
  const AdagradCoef<float> cs;
  const ParamIo<P, MODE> param;
  const G* const grad;
  const MomentRun<S, false> sum;
  const bool sr, sr_param;
  const RandomKey key;
  P* const param_data;

  Runs(const AdagradArgs& args, const AdagradTensor& t)
      : h(args.hyper),
        cv(adagrad_coef<V, float>(args.hyper, args.lr, t.step, float(args.grad_mult))),
        cs(adagrad_coef<float, float>(args.hyper, args.lr, t.step, float(args.grad_mult))),
        param{static_cast<P*>(t.param), t.master, static_cast<P*>(t.compensation)},
        grad(static_cast<const G*>(t.grad)),
        sum{t.sum, t.sum_absmax},
        sr(args.stochastic),
        sr_param(args.stochastic && std::is_same_v<P, c10::BFloat16> && MODE == PrecisionMode::PLAIN),
        key(random_key(t.seed, static_cast<int64_t>(t.step), 0)),
        param_data(static_cast<P*>(t.param)) {}

  template <bool SPARSE>
  void run(int64_t at, int64_t g_at, int64_t n) const {
    alignas(64) float s[kQuantBlock], out[kQuantBlock];
    alignas(64) uint32_t w[kQuantBlock];
    for (int64_t r = 0; r < n; r += kQuantBlock) {
      const int64_t len = std::min(kQuantBlock, n - r), i0 = at + r;
      const G* const gp = grad + g_at + r;
      if (sr) fill_random_words(key, i0, len, w);
      sum.load(i0, len, s);
      int64_t k = 0;
      for (; k + kBlock <= len; k += kBlock) {
        V p[2], g[2], sv[2];
        param.load(i0 + k, p[0], p[1]);
        Io<G>::load(gp + k, g[0], g[1]);
        Io<float>::load(s + k, sv[0], sv[1]);
        const V old[2] = {p[0], p[1]};
        for (int j = 0; j < 2; ++j) adagrad_math<SPARSE>(h, cv, p[j], g[j], sv[j]);
        Io<float>::store(s + k, sv[0], sv[1]);
        if (sr_param) {
          Io<float>::store(out + k, p[0], p[1]);
        } else {
          param.store(i0 + k, p, old);
        }
      }
      for (; k < len; ++k) {
        float p = param.load1(i0 + k);
        const float old = p;
        adagrad_math<SPARSE>(h, cs, p, float(Io<G>::load1(gp + k)), s[k]);
        if (sr_param) {
          out[k] = p;
        } else {
          param.store1(i0 + k, p, old);
        }
      }
      sum.store(i0, len, s, sr ? w : nullptr, 0);
      if constexpr (std::is_same_v<P, c10::BFloat16>) {
        if (sr_param) store_bf16_stochastic(param_data + i0, len, out, w, 16);
      }
    }
  }
};

// f(span) runs the elements a thread's range [lo, hi) of tensor x covers: the dense ones, or for a
// sparse gradient the values cut at row ends, each piece landing at its row's offset.
template <typename F>
void for_each_piece(const AdagradTensor& x, int64_t lo, int64_t hi, const F& f) {
  if (x.row_offsets == nullptr) {
    f(std::false_type{}, lo, lo, hi - lo);
    return;
  }
  const int64_t rn = x.row_numel;
  int64_t r = lo / rn;
  int64_t col = lo - r * rn;
  while (lo < hi) {
    const int64_t n = std::min(hi - lo, rn - col);
    f(std::true_type{}, x.row_offsets[r] + col, lo, n);
    lo += n;
    ++r;
    col = 0;
  }
}

template <typename P, typename G, PrecisionMode MODE, typename S>
void run(const AdagradArgs& a, TypeTag<P>, TypeTag<G>, ModeTag<MODE>, TypeTag<S>) {
  // Runs where codes or stochastic rounding need them (fp32 math only: never for fp64). Codes
  // take dense gradients only (the op's checks), and whole blocks.
  constexpr bool kCoded = std::is_same_v<S, Q8>;
  constexpr bool kMayRound = std::is_same_v<S, c10::BFloat16> || std::is_same_v<P, c10::BFloat16>;
  const bool runs = kCoded || (kMayRound && a.stochastic);
  for_each_span(a.offsets, [&](int64_t t, int64_t lo, int64_t hi) {
    const AdagradTensor& x = a.tensors[t];
    if constexpr (kCoded || kMayRound) {
      if (runs) {
        const Runs<P, G, MODE, S> span(a, x);
        if constexpr (kCoded) block_aligned<S>(lo, hi, x.numel);
        return for_each_piece(x, lo, hi, [&](auto sparse, int64_t at, int64_t g_at, int64_t n) {
          span.template run<decltype(sparse)::value>(at, g_at, n);
        });
      }
    }
    if constexpr (!kCoded) {
      const Span<P, G, MODE, S> span(a, x);
      for_each_piece(x, lo, hi, [&](auto sparse, int64_t at, int64_t g_at, int64_t n) {
        span.template run<decltype(sparse)::value>(at, g_at, n);
      });
    }
  });
}

}  // namespace

void adagrad_kernel(const AdagradArgs& a) {
  dispatch_optimizer_state_types(a.dtype, a.grad_dtype, a.mode, a.sum_dtype,
                                 [&](auto... types) { run(a, types...); });
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
