// LayerNorm / RMSNorm rows. Each row is read from memory once per pass but stays in cache between
// passes, so the statistics use two passes (mean, then the centred sum of squares) for accuracy at
// no memory cost. Statistics are accumulated in fp32 vector lanes (fp64 for fp64 input); the scalar
// tail repeats the body's operations in the same order.
#include "cpu/norm_kernel.h"

#include "cpu/rowwise.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

template <typename Acc>
inline Acc vsum(const Vectorized<Acc>& v) {
  return at::vec::vec_reduce_all<Acc>([](Vectorized<Acc>& p, Vectorized<Acc>& q) { return p + q; }, v);
}

// Parameters as the kernels read them: pointers of type P, with ones/zeros standing in for absent ones.
template <typename P>
struct Params {
  const P* weight;
  const P* bias;
  std::vector<P> fill;  // backing store of the stand-ins

  Params(const void* w, const void* b, int64_t cols, bool need_bias) {
    if (w == nullptr || (need_bias && b == nullptr)) fill.assign(2 * cols, P(0));
    if (w == nullptr) std::fill(fill.begin(), fill.begin() + cols, P(1));
    weight = w ? static_cast<const P*>(w) : fill.data();
    bias = b ? static_cast<const P*>(b) : fill.data() + cols;
  }
};

template <typename T, typename P, bool RMS>
void forward_rows(const NormForwardArgs& a, const Params<P>& prm, int64_t r0, int64_t r1) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kB = block_size<Acc>();
  const int64_t n = a.cols;
  const Acc eps = static_cast<Acc>(a.eps);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * n;
    T* y = static_cast<T*>(a.y) + r * n;
    const T* h = x;

    // ---- pass 1: h = x + residual (stored, rounded to T: the norm sees what is returned), and
    // sum(h) for LayerNorm or sum(h^2) for RMSNorm.
    V s0(Acc(0)), s1(Acc(0));
    Acc s;
    int64_t i = 0;
    if (a.residual != nullptr) {
      const T* res = static_cast<const T*>(a.residual) + r * n;
      T* sum = static_cast<T*>(a.sum) + r * n;
      for (; i + kB <= n; i += kB) {
        V p, q, rp, rq;
        Io<T>::load(x + i, p, q);
        Io<T>::load(res + i, rp, rq);
        p = p + rp;
        q = q + rq;
        Io<T>::store(sum + i, p, q);
        Io<T>::round(p, q);
        s0 = RMS ? s0 + p * p : s0 + p;
        s1 = RMS ? s1 + q * q : s1 + q;
      }
      s = vsum(s0 + s1);
      for (; i < n; ++i) {
        const Acc v = Io<T>::round1(Io<T>::load1(x + i) + Io<T>::load1(res + i));
        Io<T>::store1(sum + i, v);
        s += RMS ? v * v : v;
      }
      h = sum;
    } else {
      for (; i + kB <= n; i += kB) {
        V p, q;
        Io<T>::load(x + i, p, q);
        s0 = RMS ? s0 + p * p : s0 + p;
        s1 = RMS ? s1 + q * q : s1 + q;
      }
      s = vsum(s0 + s1);
      for (; i < n; ++i) {
        const Acc v = Io<T>::load1(x + i);
        s += RMS ? v * v : v;
      }
    }

    // ---- pass 2 (LayerNorm): var = mean((h - mean)^2)
    Acc mean = Acc(0), rstd;
    if constexpr (RMS) {
      rstd = Acc(1) / std::sqrt(s / Acc(n) + eps);
    } else {
      mean = s / Acc(n);
      const V m(mean);
      V v0(Acc(0)), v1(Acc(0));
      for (i = 0; i + kB <= n; i += kB) {
        V p, q;
        Io<T>::load(h + i, p, q);
        p = p - m;
        q = q - m;
        v0 = v0 + p * p;
        v1 = v1 + q * q;
      }
      Acc var = vsum(v0 + v1);
      for (; i < n; ++i) {
        const Acc d = Io<T>::load1(h + i) - mean;
        var += d * d;
      }
      rstd = Acc(1) / std::sqrt(var / Acc(n) + eps);
      static_cast<Acc*>(a.mean)[r] = mean;
    }
    static_cast<Acc*>(a.rstd)[r] = rstd;

    // ---- pass 3: y = (h - mean) * rstd * weight + bias   (RMSNorm: y = h * rstd * weight)
    const V m(mean), rs(rstd);
    for (i = 0; i + kB <= n; i += kB) {
      V p, q, wp, wq;
      Io<T>::load(h + i, p, q);
      Io<P>::load(prm.weight + i, wp, wq);
      p = (p - m) * rs * wp;
      q = (q - m) * rs * wq;
      if constexpr (!RMS) {
        V bp, bq;
        Io<P>::load(prm.bias + i, bp, bq);
        p = p + bp;
        q = q + bq;
      }
      Io<T>::store(y + i, p, q);
    }
    for (; i < n; ++i) {
      Acc v = (Io<T>::load1(h + i) - mean) * rstd * Io<P>::load1(prm.weight + i);
      if constexpr (!RMS) v = v + Io<P>::load1(prm.bias + i);
      Io<T>::store1(y + i, v);
    }
  }
}

// One row of the backward. With xhat = (h - mean) * rstd and g = dy * weight:
//   dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dsum       (RMSNorm: no mean(g) term)
//   dweight += dy * xhat,  dbias += dy                               (into this block's partial row)
template <typename T, typename P, bool RMS, bool PARAM_GRADS>
void backward_row(const NormBackwardArgs& a, const P* weight, int64_t r, opmath_t<T>* dw, opmath_t<T>* db) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kB = block_size<Acc>();
  const int64_t n = a.cols;
  const T* h = static_cast<const T*>(a.h) + r * n;
  const T* dy = static_cast<const T*>(a.dy) + r * n;
  T* dx = static_cast<T*>(a.dx) + r * n;
  const Acc mean = RMS ? Acc(0) : static_cast<const Acc*>(a.mean)[r];
  const Acc rstd = static_cast<const Acc*>(a.rstd)[r];
  const V m(mean), rs(rstd);

  // ---- pass 1: sum(g), sum(g * xhat); the parameter gradients' partial sums
  V g0(Acc(0)), g1(Acc(0)), gx0(Acc(0)), gx1(Acc(0));
  int64_t i = 0;
  for (; i + kB <= n; i += kB) {
    V hp, hq, dp, dq, wp, wq;
    Io<T>::load(h + i, hp, hq);
    Io<T>::load(dy + i, dp, dq);
    Io<P>::load(weight + i, wp, wq);
    const V xp = (hp - m) * rs, xq = (hq - m) * rs;
    const V gp = dp * wp, gq = dq * wq;
    g0 = g0 + gp;
    g1 = g1 + gq;
    gx0 = gx0 + gp * xp;
    gx1 = gx1 + gq * xq;
    if constexpr (PARAM_GRADS) {
      V ap, aq;
      Io<Acc>::load(dw + i, ap, aq);
      Io<Acc>::store(dw + i, ap + dp * xp, aq + dq * xq);
      if constexpr (!RMS) {
        Io<Acc>::load(db + i, ap, aq);
        Io<Acc>::store(db + i, ap + dp, aq + dq);
      }
    }
  }
  Acc sum_g = vsum(g0 + g1), sum_gx = vsum(gx0 + gx1);
  for (; i < n; ++i) {
    const Acc d = Io<T>::load1(dy + i);
    const Acc xhat = (Io<T>::load1(h + i) - mean) * rstd;
    const Acc g = d * Io<P>::load1(weight + i);
    sum_g += g;
    sum_gx += g * xhat;
    if constexpr (PARAM_GRADS) {
      dw[i] = dw[i] + d * xhat;
      if constexpr (!RMS) db[i] = db[i] + d;
    }
  }

  // ---- pass 2: dh = rstd * (g - (c1 + xhat * c2)) [+ dsum]
  const Acc c1 = RMS ? Acc(0) : sum_g / Acc(n), c2 = sum_gx / Acc(n);
  const V vc1(c1), vc2(c2);
  const T* ds = a.dsum != nullptr ? static_cast<const T*>(a.dsum) + r * n : nullptr;
  for (i = 0; i + kB <= n; i += kB) {
    V hp, hq, dp, dq, wp, wq;
    Io<T>::load(h + i, hp, hq);
    Io<T>::load(dy + i, dp, dq);
    Io<P>::load(weight + i, wp, wq);
    const V xp = (hp - m) * rs, xq = (hq - m) * rs;
    V op = rs * (dp * wp - (vc1 + xp * vc2));
    V oq = rs * (dq * wq - (vc1 + xq * vc2));
    if (ds != nullptr) {
      V sp, sq;
      Io<T>::load(ds + i, sp, sq);
      op = op + sp;
      oq = oq + sq;
    }
    Io<T>::store(dx + i, op, oq);
  }
  for (; i < n; ++i) {
    const Acc xhat = (Io<T>::load1(h + i) - mean) * rstd;
    Acc o = rstd * (Io<T>::load1(dy + i) * Io<P>::load1(weight + i) - (c1 + xhat * c2));
    if (ds != nullptr) o = o + Io<T>::load1(ds + i);
    Io<T>::store1(dx + i, o);
  }
}

template <typename T, typename P, bool RMS>
void backward(const NormBackwardArgs& a) {
  using Acc = opmath_t<T>;
  const int64_t n = a.cols;
  const Params<P> prm(a.weight, nullptr, n, false);
  const bool param_grads = a.dweight != nullptr || a.dbias != nullptr;
  // NOTE [deterministic column sums] (rowwise.h): one partial [dweight | dbias] row per block.
  const RowBlocks blocks(a.rows, n);
  std::vector<Acc> partial(param_grads ? blocks.count * 2 * n : 0, Acc(0));
  at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Acc* dw = param_grads ? partial.data() + b * 2 * n : nullptr;
      for (int64_t r = blocks.begin(b); r < blocks.end(b); ++r) {
        if (param_grads) {
          backward_row<T, P, RMS, true>(a, prm.weight, r, dw, dw + n);
        } else {
          backward_row<T, P, RMS, false>(a, prm.weight, r, nullptr, nullptr);
        }
      }
    }
  });
  if (a.dweight != nullptr) sum_partials(partial.data(), blocks.count, 2 * n, n, static_cast<P*>(a.dweight));
  if (a.dbias != nullptr) sum_partials(partial.data() + n, blocks.count, 2 * n, n, static_cast<P*>(a.dbias));
}

}  // namespace

void norm_forward_kernel(const NormForwardArgs& a) {
  dispatch_pair(a.dtype, a.param_dtype, [&](auto t, auto p) {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    const Params<P> prm(a.weight, a.bias, a.cols, !a.rms);
    const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(a.cols, 1));
    at::parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
      if (a.rms) {
        forward_rows<T, P, true>(a, prm, r0, r1);
      } else {
        forward_rows<T, P, false>(a, prm, r0, r1);
      }
    });
  });
}

void norm_backward_kernel(const NormBackwardArgs& a) {
  dispatch_pair(a.dtype, a.param_dtype, [&](auto t, auto p) {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    if (a.rms) {
      backward<T, P, true>(a);
    } else {
      backward<T, P, false>(a);
    }
  });
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
