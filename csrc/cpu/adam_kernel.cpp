// Adam / AdamW on the CPU: one parallel region over every tensor of a call, at::vec in the body,
// a scalar tail with the same operations in the same order (csrc/adam_math.h), so results do not
// depend on where a thread's range starts. Moments stored as int8 codes, or rounded stochastically,
// take the run path of csrc/cpu/state_io.h (NOTE [compressed optimizer state]).
#include "cpu/adam_kernel.h"
#include "cpu/param_io.h"
#include "cpu/state_io.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE, moment
// storage M (not Q8: moments read and written in place).
template <typename P, typename G, PrecisionMode MODE, typename M>
void adam_span(const AdamArgs& a, const AdamTensor& t, int64_t lo, int64_t hi) {
  using Acc = opmath_t<P>;
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

// What the run paths read of a tensor: its arrays, and the step's coefficients (scalar and vector).
template <typename P, typename G, PrecisionMode MODE, typename M>
struct RunArrays {
  ParamIo<P, MODE> param;
  const G* grad;
  MomentRun<M, true> exp_avg;
  MomentRun<M, false> exp_avg_sq, max_sq;
  AdamCoef<float> cs;
  AdamCoef<Vectorized<float>> cv;
};

template <typename P, typename G, PrecisionMode MODE, typename M>
RunArrays<P, G, MODE, M> run_arrays(const AdamArgs& a, const AdamTensor& t) {
  return {{static_cast<P*>(t.param), t.master, static_cast<P*>(t.compensation)},
          static_cast<const G*>(t.grad),
          {t.exp_avg, t.exp_avg_absmax},
          {t.exp_avg_sq, t.exp_avg_sq_absmax},
          {t.max_exp_avg_sq, t.max_exp_avg_sq_absmax},
          adam_coef<float, float>(a.hyper, a.lr, t.step, float(a.grad_mult)),
          adam_coef<Vectorized<float>, float>(a.hyper, a.lr, t.step, float(a.grad_mult))};
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// int8 moments rounded to nearest: adam_runs with the codes decoded straight into the vector body
// and each block's absmax gathered there, so that the codec's integer work runs beside the
// divisions and square roots of the update rather than in passes of its own. Same values as
// adam_runs: only the order of independent loads and of an exact maximum differs.
template <typename P, typename G, PrecisionMode MODE>
void adam_q8_blocks(const AdamArgs& a, const AdamTensor& t, const RunArrays<P, G, MODE, Q8>& r, int64_t lo,
                    int64_t hi) {
  using V = Vectorized<float>;
  constexpr int64_t kLanes = V::size();
  constexpr int64_t kBlock = block_size<float>();
  static_assert(kLanes == kQ8Lanes && kBlock == 2 * kLanes);
  const auto& [param, grad, exp_avg, exp_avg_sq, max_sq, cs, cv] = r;
  const bool amsgrad = a.hyper.amsgrad;

  alignas(64) float m[kQuantBlock], v[kQuantBlock], x[kQuantBlock];
  block_aligned<Q8>(lo, hi, t.numel);
  for (int64_t at = lo; at < hi; at += kQuantBlock) {
    const int64_t n = std::min(kQuantBlock, hi - at), b = at / kQuantBlock;
    const auto* cm = static_cast<const uint8_t*>(t.exp_avg) + at;
    const auto* cv2 = static_cast<const uint8_t*>(t.exp_avg_sq) + at;
    const auto* cx = amsgrad ? static_cast<const uint8_t*>(t.max_exp_avg_sq) + at : nullptr;
    const float sm = t.exp_avg_absmax[b], sv = t.exp_avg_sq_absmax[b], sx = amsgrad ? t.max_exp_avg_sq_absmax[b] : 0.f;
    const Q8F vsm = q8_setf(sm), vsv = q8_setf(sv), vsx = q8_setf(sx);
    Q8I lm = q8_zero(), lv = q8_zero(), lx = q8_zero();
    int64_t k = 0;
    for (; k + kBlock <= n; k += kBlock) {
      V p[2], g[2], mv[2], vv[2], xv[2];
      param.load(at + k, p[0], p[1]);
      Io<G>::load(grad + at + k, g[0], g[1]);
      for (int j = 0; j < 2; ++j) {
        mv[j] = q8_mul(q8_decode<true>(cm + k + j * kLanes), vsm);
        vv[j] = q8_mul(q8_decode<false>(cv2 + k + j * kLanes), vsv);
        if (amsgrad) xv[j] = q8_mul(q8_decode<false>(cx + k + j * kLanes), vsx);
      }
      const V old[2] = {p[0], p[1]};
      for (int j = 0; j < 2; ++j) adam_math(a.hyper, cv, p[j], g[j], mv[j], vv[j], xv[j]);
      for (int j = 0; j < 2; ++j) {
        q8_storef(m + k + j * kLanes, mv[j]);
        q8_storef(v + k + j * kLanes, vv[j]);
        lm = q8_max_finite(lm, mv[j]);
        lv = q8_max_finite(lv, vv[j]);
        if (amsgrad) {
          q8_storef(x + k + j * kLanes, xv[j]);
          lx = q8_max_finite(lx, xv[j]);
        }
      }
      param.store(at + k, p, old);
    }
    const int64_t tail = k;
    for (; k < n; ++k) {
      float p = param.load1(at + k);
      const float old = p;
      m[k] = decode_code<true>(cm[k]) * sm;
      v[k] = decode_code<false>(cv2[k]) * sv;
      x[k] = amsgrad ? decode_code<false>(cx[k]) * sx : 0.f;
      adam_math(a.hyper, cs, p, float(Io<G>::load1(grad + at + k)), m[k], v[k], x[k]);
      param.store1(at + k, p, old);
    }
    auto largest = [&](Q8I acc, const float* in) {
      const int32_t l = tail > 0 ? q8_reduce_max(acc) : 0, r = q8_largest(in + tail, n - tail);
      return l > r ? l : r;
    };
    exp_avg.store_codes(at, n, m, largest(lm, m), nullptr, 0);
    exp_avg_sq.store_codes(at, n, v, largest(lv, v), nullptr, 0);
    if (amsgrad) max_sq.store_codes(at, n, x, largest(lx, x), nullptr, 0);
  }
}
#endif

// The run path: runs of up to kQuantBlock elements (whole blocks for Q8) loaded into fp32 arrays,
// updated with the same vector body and scalar tail, and stored: moments as codes or rounded
// stochastically (random word 0: exp_avg, exp_avg_sq; word 1: max_exp_avg_sq, the parameter).
template <typename P, typename G, PrecisionMode MODE, typename M>
void adam_runs(const AdamArgs& a, const AdamTensor& t, int64_t lo, int64_t hi) {
  using V = Vectorized<float>;
  constexpr int64_t kBlock = block_size<float>();
  const RunArrays<P, G, MODE, M> r = run_arrays<P, G, MODE, M>(a, t);
  const auto& [param, grad, exp_avg, exp_avg_sq, max_sq, cs, cv] = r;
  const bool amsgrad = a.hyper.amsgrad;
  const bool sr = a.stochastic;
  const bool sr_param = sr && std::is_same_v<P, c10::BFloat16> && MODE == PrecisionMode::PLAIN;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<M, Q8>) {
    if (!sr) return adam_q8_blocks<P, G, MODE>(a, t, r, lo, hi);
  }
#endif
  const auto step = static_cast<int64_t>(t.step);
  const RandomKey key0 = random_key(t.seed, step, 0), key1 = random_key(t.seed, step, 1);

  alignas(64) float m[kQuantBlock], v[kQuantBlock], x[kQuantBlock], out[kQuantBlock];
  alignas(64) uint32_t w0[kQuantBlock], w1[kQuantBlock];
  block_aligned<M>(lo, hi, t.numel);
  for (int64_t at = lo; at < hi; at += kQuantBlock) {
    const int64_t n = std::min(kQuantBlock, hi - at);
    if (sr) {
      fill_random_words(key0, at, n, w0);
      if (amsgrad || sr_param) fill_random_words(key1, at, n, w1);
    }
    exp_avg.load(at, n, m);
    exp_avg_sq.load(at, n, v);
    if (amsgrad) max_sq.load(at, n, x);
    int64_t k = 0;
    for (; k + kBlock <= n; k += kBlock) {
      V p[2], g[2], mv[2], vv[2], xv[2];
      param.load(at + k, p[0], p[1]);
      Io<G>::load(grad + at + k, g[0], g[1]);
      Io<float>::load(m + k, mv[0], mv[1]);
      Io<float>::load(v + k, vv[0], vv[1]);
      if (amsgrad) Io<float>::load(x + k, xv[0], xv[1]);
      const V old[2] = {p[0], p[1]};
      for (int j = 0; j < 2; ++j) adam_math(a.hyper, cv, p[j], g[j], mv[j], vv[j], xv[j]);
      Io<float>::store(m + k, mv[0], mv[1]);
      Io<float>::store(v + k, vv[0], vv[1]);
      if (amsgrad) Io<float>::store(x + k, xv[0], xv[1]);
      if (sr_param) {
        Io<float>::store(out + k, p[0], p[1]);
      } else {
        param.store(at + k, p, old);
      }
    }
    for (; k < n; ++k) {
      float p = param.load1(at + k);
      const float old = p;
      adam_math(a.hyper, cs, p, float(Io<G>::load1(grad + at + k)), m[k], v[k], x[k]);
      if (sr_param) {
        out[k] = p;
      } else {
        param.store1(at + k, p, old);
      }
    }
    exp_avg.store(at, n, m, sr ? w0 : nullptr, 0);
    exp_avg_sq.store(at, n, v, sr ? w0 : nullptr, 16);
    if (amsgrad) max_sq.store(at, n, x, sr ? w1 : nullptr, 0);
    if constexpr (std::is_same_v<P, c10::BFloat16>) {
      if (sr_param) store_bf16_stochastic(static_cast<P*>(t.param) + at, n, out, w1, 16);
    }
  }
}

template <typename P, typename G, PrecisionMode MODE, typename M>
void run(const AdamArgs& a, TypeTag<P>, TypeTag<G>, ModeTag<MODE>, TypeTag<M>) {
  // Runs where codes or stochastic rounding need them (fp32 math only: never for fp64).
  constexpr bool kCoded = std::is_same_v<M, Q8>;
  constexpr bool kMayRound = std::is_same_v<M, c10::BFloat16> || std::is_same_v<P, c10::BFloat16>;
  const bool runs = kCoded || (kMayRound && a.stochastic);
  for_each_span(a.offsets, [&](int64_t t, int64_t lo, int64_t hi) {
    if constexpr (kCoded || kMayRound) {
      if (runs) return adam_runs<P, G, MODE, M>(a, a.tensors[t], lo, hi);
    }
    if constexpr (!kCoded) adam_span<P, G, MODE, M>(a, a.tensors[t], lo, hi);
  });
}

}  // namespace

void adam_kernel(const AdamArgs& a) {
  dispatch_optimizer_state_types(a.dtype, a.grad_dtype, a.mode, a.moment_dtype,
                                 [&](auto... types) { run(a, types...); });
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
