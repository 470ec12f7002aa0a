// LayerNorm / RMSNorm rows: a pass for the statistics and a pass for the output, the row staying in
// cache between them (a third, exact variance pass when NOTE [one-pass variance] asks for it).
// Statistics are accumulated in fp32 vector lanes (fp64 for fp64 input); the scalar tail repeats the
// body's operations in the same order.
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
    bias = b ? static_cast<const P*>(b) : (fill.empty() ? nullptr : fill.data() + cols);
  }
};

// Pass 1 over a row: h = x (+ residual, stored rounded to T: the norm sees what is returned) and
// sum(h), sum(h^2) (only the latter for RMSNorm), four independent vector accumulators.
template <typename T, bool RMS, bool RESIDUAL>
void row_sums(const T* x, const T* res, T* sum, int64_t n, opmath_t<T>& s_out, opmath_t<T>& sq_out) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kB = block_size<Acc>();
  V s0(Acc(0)), s1(Acc(0)), q0(Acc(0)), q1(Acc(0));
  int64_t i = 0;
  for (; i + kB <= n; i += kB) {
    V p, q;
    Io<T>::load(x + i, p, q);
    if constexpr (RESIDUAL) {
      V rp, rq;
      Io<T>::load(res + i, rp, rq);
      p = p + rp;
      q = q + rq;
      Io<T>::store(sum + i, p, q);
      Io<T>::round(p, q);
    }
    if constexpr (!RMS) {
      s0 = s0 + p;
      s1 = s1 + q;
    }
    q0 = q0 + p * p;
    q1 = q1 + q * q;
  }
  Acc s = vsum(s0 + s1), sq = vsum(q0 + q1);
  for (; i < n; ++i) {
    Acc v = Io<T>::load1(x + i);
    if constexpr (RESIDUAL) {
      v = Io<T>::round1(v + Io<T>::load1(res + i));
      Io<T>::store1(sum + i, v);
    }
    s += v;
    sq += v * v;
  }
  s_out = s;
  sq_out = sq;
}

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
    Acc s, sq;
    if (a.residual != nullptr) {
      T* sum = static_cast<T*>(a.sum) + r * n;
      row_sums<T, RMS, true>(x, static_cast<const T*>(a.residual) + r * n, sum, n, s, sq);
      h = sum;
    } else {
      row_sums<T, RMS, false>(x, nullptr, nullptr, n, s, sq);
    }

    Acc mean = Acc(0), rstd;
    if constexpr (RMS) {
      rstd = Acc(1) / std::sqrt(sq / Acc(n) + eps);
    } else {
      mean = s / Acc(n);
      Acc var = sq / Acc(n) - mean * mean;
      // NOTE [one-pass variance]: E[h^2] - mean^2 is as accurate as the centred sum while the mean is
      // no larger than the spread (mean^2 <= var: at most one bit cancels), which is the usual case;
      // otherwise (and for NaN) the exact second pass over the row, still in cache, decides.
      if (!(mean * mean <= var)) {
        const V m(mean);
        V v0(Acc(0)), v1(Acc(0));
        int64_t i = 0;
        for (; i + kB <= n; i += kB) {
          V p, q;
          Io<T>::load(h + i, p, q);
          p = p - m;
          q = q - m;
          v0 = v0 + p * p;
          v1 = v1 + q * q;
        }
        var = vsum(v0 + v1);
        for (; i < n; ++i) {
          const Acc d = Io<T>::load1(h + i) - mean;
          var += d * d;
        }
        var = var / Acc(n);
      }
      rstd = Acc(1) / std::sqrt(var + eps);
      static_cast<Acc*>(a.mean)[r] = mean;
    }
    static_cast<Acc*>(a.rstd)[r] = rstd;

    // ---- last pass: y = (h - mean) * rstd * weight + bias   (RMSNorm: y = h * rstd * weight)
    const V m(mean), rs(rstd);
    int64_t i = 0;
    for (; i + kB <= n; i += kB) {
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

// The backward, with xhat = (h - mean) * rstd and g = dy * weight:
//   dh = rstd * (g - (c1 + xhat * c2)) + dsum,  c1 = mean(g) (0 for RMSNorm), c2 = mean(g * xhat)
//   dweight += dy * xhat,  dbias += dy          (into the row block's partial row)
// Rows go in groups of kGroup: pass 1 gives each row its c1, c2; pass 2 then walks the group's rows
// together, block by block, so the partial row is loaded and stored once per group rather than once
// per row (stores are what limits this loop).
constexpr int64_t kGroup = 4;

template <typename Acc>
struct RowCoefficients {
  Acc mean, rstd, c1, c2;
};

// Pass 1 over one row: c1 and c2.
template <typename T, typename P, bool RMS>
RowCoefficients<opmath_t<T>> row_coefficients(const NormBackwardArgs& a, const P* weight, int64_t r) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kB = block_size<Acc>();
  const int64_t n = a.cols;
  const T* h = static_cast<const T*>(a.h) + r * n;
  const T* dy = static_cast<const T*>(a.dy) + r * n;
  const Acc mean = RMS ? Acc(0) : static_cast<const Acc*>(a.mean)[r];
  const Acc rstd = static_cast<const Acc*>(a.rstd)[r];
  const V m(mean), rs(rstd);
  V g0(Acc(0)), g1(Acc(0)), gx0(Acc(0)), gx1(Acc(0));
  int64_t i = 0;
  for (; i + kB <= n; i += kB) {
    V hp, hq, dp, dq, wp, wq;
    Io<T>::load(h + i, hp, hq);
    Io<T>::load(dy + i, dp, dq);
    Io<P>::load(weight + i, wp, wq);
    const V gp = dp * wp, gq = dq * wq;
    g0 = g0 + gp;
    g1 = g1 + gq;
    gx0 = gx0 + gp * ((hp - m) * rs);
    gx1 = gx1 + gq * ((hq - m) * rs);
  }
  Acc sum_g = vsum(g0 + g1), sum_gx = vsum(gx0 + gx1);
  for (; i < n; ++i) {
    const Acc g = Io<T>::load1(dy + i) * Io<P>::load1(weight + i);
    sum_g += g;
    sum_gx += g * ((Io<T>::load1(h + i) - mean) * rstd);
  }
  return {mean, rstd, RMS ? Acc(0) : sum_g / Acc(n), sum_gx / Acc(n)};
}

// Pass 2 over rows r0 .. r0 + g - 1 (g <= kGroup): dx, and the group's terms of the partial sums.
template <typename T, typename P, bool RMS, bool PARAM_GRADS>
void group_pass2(const NormBackwardArgs& a, const P* weight, int64_t r0, int64_t g,
                 const RowCoefficients<opmath_t<T>>* rc, opmath_t<T>* dw, opmath_t<T>* db) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kB = block_size<Acc>();
  const int64_t n = a.cols;
  const T* h = static_cast<const T*>(a.h) + r0 * n;
  const T* dy = static_cast<const T*>(a.dy) + r0 * n;
  const T* ds = a.dsum != nullptr ? static_cast<const T*>(a.dsum) + r0 * n : nullptr;
  T* dx = static_cast<T*>(a.dx) + r0 * n;
  V m[kGroup], rs[kGroup], c1[kGroup], c2[kGroup];
  for (int64_t k = 0; k < g; ++k) {
    m[k] = V(rc[k].mean);
    rs[k] = V(rc[k].rstd);
    c1[k] = V(rc[k].c1);
    c2[k] = V(rc[k].c2);
  }
  int64_t i = 0;
  for (; i + kB <= n; i += kB) {
    V wp, wq, dwp, dwq, dbp, dbq;
    Io<P>::load(weight + i, wp, wq);
    if constexpr (PARAM_GRADS) {
      Io<Acc>::load(dw + i, dwp, dwq);
      if constexpr (!RMS) Io<Acc>::load(db + i, dbp, dbq);
    }
    for (int64_t k = 0; k < g; ++k) {
      const int64_t o = k * n + i;
      V hp, hq, dp, dq;
      Io<T>::load(h + o, hp, hq);
      Io<T>::load(dy + o, dp, dq);
      const V xp = (hp - m[k]) * rs[k], xq = (hq - m[k]) * rs[k];
      V op = rs[k] * (dp * wp - (c1[k] + xp * c2[k]));
      V oq = rs[k] * (dq * wq - (c1[k] + xq * c2[k]));
      if (ds != nullptr) {
        V sp, sq;
        Io<T>::load(ds + o, sp, sq);
        op = op + sp;
        oq = oq + sq;
      }
      Io<T>::store(dx + o, op, oq);
      if constexpr (PARAM_GRADS) {
        dwp = dwp + dp * xp;
        dwq = dwq + dq * xq;
        if constexpr (!RMS) {
          dbp = dbp + dp;
          dbq = dbq + dq;
        }
      }
    }
    if constexpr (PARAM_GRADS) {
      Io<Acc>::store(dw + i, dwp, dwq);
      if constexpr (!RMS) Io<Acc>::store(db + i, dbp, dbq);
    }
  }
  for (; i < n; ++i) {
    const Acc w = Io<P>::load1(weight + i);
    Acc dwi = PARAM_GRADS ? dw[i] : Acc(0), dbi = PARAM_GRADS && !RMS ? db[i] : Acc(0);
    for (int64_t k = 0; k < g; ++k) {
      const int64_t o = k * n + i;
      const Acc d = Io<T>::load1(dy + o);
      const Acc xhat = (Io<T>::load1(h + o) - rc[k].mean) * rc[k].rstd;
      Acc out = rc[k].rstd * (d * w - (rc[k].c1 + xhat * rc[k].c2));
      if (ds != nullptr) out = out + Io<T>::load1(ds + o);
      Io<T>::store1(dx + o, out);
      dwi = dwi + d * xhat;
      dbi = dbi + d;
    }
    if constexpr (PARAM_GRADS) {
      dw[i] = dwi;
      if constexpr (!RMS) db[i] = dbi;
    }
  }
}

template <typename T, typename P, bool RMS>
void backward(const NormBackwardArgs& a) {
  using Acc = opmath_t<T>;
  const int64_t n = a.cols;
  const Params<P> prm(a.weight, nullptr, n, false);
  const bool param_grads = a.dweight != nullptr || a.dbias != nullptr;
  // NOTE [deterministic column sums] (rowwise.h): one partial [dweight | dbias] row per block, the
  // block's rows added in row order.
  const RowBlocks blocks(a.rows, n);
  std::vector<Acc> partial(param_grads ? blocks.count * 2 * n : 0, Acc(0));
  at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
    RowCoefficients<Acc> rc[kGroup];
    for (int64_t b = b0; b < b1; ++b) {
      Acc* dw = param_grads ? partial.data() + b * 2 * n : nullptr;
      for (int64_t r = blocks.begin(b); r < blocks.end(b); r += kGroup) {
        const int64_t g = std::min(kGroup, blocks.end(b) - r);
        for (int64_t k = 0; k < g; ++k) rc[k] = row_coefficients<T, P, RMS>(a, prm.weight, r + k);
        if (param_grads) {
          group_pass2<T, P, RMS, true>(a, prm.weight, r, g, rc, dw, dw + n);
        } else {
          group_pass2<T, P, RMS, false>(a, prm.weight, r, g, rc, nullptr, nullptr);
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
