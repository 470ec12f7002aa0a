// bias + GELU and SwiGLU, forward and backward. Work is cut into (row, column tile) tasks so that
// few long rows parallelize as well as many short ones. Each row's tail runs the body's vector code
// on a zero-padded block (rowwise.h), so every element goes through the same instructions.
#include "cpu/activation_kernel.h"

#include "cpu/rowwise.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kTile = 2048;  // columns per task; a multiple of every block size

constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kKappa = 0.044715;

// ---- elementary functions. The fp32 ones are written for the arguments these kernels pass: at::vec's
// erf/exp/tanh call Sleef's general routines, which make GELU compute-bound on the CPU. fp64 (used for
// gradcheck) keeps at::vec's accurate routines.
template <typename Acc> struct Elementary;

template <>
struct Elementary<float> {
  using V = Vectorized<float>;

  // exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact product),
  // exp(r) by its degree-6 Taylor polynomial (truncation 1.2e-7 relative), times 2^n built in the
  // exponent bits; exactly 0 below -87.3 (fp32 underflow), NaN stays NaN.
  static V exp_nonpositive(const V& x) {
    const V lo(-87.3f);
    const V xc = at::vec::maximum(x, lo);
    const V n = at::vec::fmadd(xc, V(1.44269504088896341f), V(0.5f)).floor();
    V r = at::vec::fmadd(n, V(-0.693145751953125f), xc);
    r = at::vec::fmadd(n, V(-1.428606765330187e-06f), r);
    V p = at::vec::fmadd(V(1.f / 720), r, V(1.f / 120));
    p = at::vec::fmadd(p, r, V(1.f / 24));
    p = at::vec::fmadd(p, r, V(1.f / 6));
    p = at::vec::fmadd(p, r, V(0.5f));
    p = at::vec::fmadd(p, r, V(1.f));
    p = at::vec::fmadd(p, r, V(1.f));
    const auto biased = at::vec::convert_to_int_of_same_size(n) + Vectorized<int32_t>(127);  // in [1, 127]
    const V scale = at::vec::cast<float>(biased << Vectorized<int32_t>(23));
    return V::blendv(p * scale, V(0.f), x < lo);
  }

  // Phi(h) = (1 + erf(h/sqrt2))/2 and e = exp(-h^2/2). erf by Abramowitz & Stegun 7.1.26 (|error| <=
  // 1.5e-7, the formula torch's vectorized erf uses): erfc(z) = t P(t) exp(-z^2), t = 1/(1 + p z), and
  // with z = |h|/sqrt2 that exp is e, which the GELU derivative needs too: computed once. The lower
  // tail Phi(-|h|) = erfc(z)/2 is formed directly, without 1 - erf cancelling.
  static void normal_cdf_and_exp(const V& h, V& cdf, V& e) {
    e = exp_nonpositive(h * h * V(-0.5f));
    const V z = (h * V(float(kSqrtHalf))).abs();
    const V t = V(1.f) / at::vec::fmadd(V(0.3275911f), z, V(1.f));
    V poly = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
    poly = at::vec::fmadd(poly, t, V(1.421413741f));
    poly = at::vec::fmadd(poly, t, V(-0.284496736f));
    poly = at::vec::fmadd(poly, t, V(0.254829592f));
    const V lower = V(0.5f) * poly * t * e;  // Phi(-|h|)
    cdf = V::blendv(V(1.f) - lower, lower, h < V(0.f));
  }

  // tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) <= 1.
  static V tanh(const V& u) {
    const V e = exp_nonpositive(u.abs() * V(-2.f));
    const V t = (V(1.f) - e) / (V(1.f) + e);
    return V::blendv(t, V(0.f) - t, u < V(0.f));
  }
};

template <>
struct Elementary<double> {
  using V = Vectorized<double>;
  static V exp_nonpositive(const V& x) { return x.exp(); }
  static void normal_cdf_and_exp(const V& h, V& cdf, V& e) {
    e = (h * h * V(-0.5)).exp();
    cdf = V(0.5) * (V(1.) + (h * V(kSqrtHalf)).erf());
  }
  static V tanh(const V& u) { return u.tanh(); }
};

// GELU and its derivative on opmath vectors, h = x + bias:
//   erf:  gelu(h) = h Phi(h),  gelu'(h) = Phi(h) + h exp(-h^2/2)/sqrt(2pi),   Phi(h) = (1 + erf(h/sqrt2))/2
//   tanh: gelu(h) = h/2 (1 + t), t = tanh(k0 (h + k1 h^3)),
//         gelu'(h) = (1 + t)/2 + h/2 (1 - t^2) k0 (1 + 3 k1 h^2),   k0 = sqrt(2/pi), k1 = 0.044715
template <typename Acc>
struct Gelu {
  using V = Vectorized<Acc>;
  using E = Elementary<Acc>;

  template <GeluApproximation A>
  static V value(const V& h) {
    if constexpr (A == GeluApproximation::NONE) {
      V cdf, e;
      E::normal_cdf_and_exp(h, cdf, e);
      return h * cdf;
    } else {
      const V t = E::tanh(V(Acc(kSqrt2OverPi)) * (h + V(Acc(kKappa)) * h * h * h));
      return V(Acc(0.5)) * h * (V(Acc(1)) + t);
    }
  }

  template <GeluApproximation A>
  static V derivative(const V& h) {
    if constexpr (A == GeluApproximation::NONE) {
      V cdf, e;
      E::normal_cdf_and_exp(h, cdf, e);
      return cdf + h * e * V(Acc(kInvSqrt2Pi));
    } else {
      const V h2 = h * h;
      const V t = E::tanh(V(Acc(kSqrt2OverPi)) * (h + V(Acc(kKappa)) * h2 * h));
      const V dt = V(Acc(kSqrt2OverPi)) * (V(Acc(1)) + V(Acc(3 * kKappa)) * h2);
      return V(Acc(0.5)) * (V(Acc(1)) + t) + V(Acc(0.5)) * h * (V(Acc(1)) - t * t) * dt;
    }
  }
};

// Calls f(j, n) for the blocks of columns [j0, j1) of a row of `cols`: n == block size in the body,
// n < block size for the row's tail.
template <int64_t kB, typename F>
inline void for_blocks(int64_t j0, int64_t j1, const F& f) {
  int64_t j = j0;
  for (; j + kB <= j1; j += kB) f(j, kB);
  if (j < j1) f(j, j1 - j);
}

template <typename T, typename V>
inline void load_n(const T* p, int64_t n, V& a, V& b) {
  if (n == 2 * V::size()) {
    Io<T>::load(p, a, b);
  } else {
    load_tail(p, n, a, b);
  }
}

template <typename T, typename V>
inline void store_n(T* p, int64_t n, const V& a, const V& b) {
  if (n == 2 * V::size()) {
    Io<T>::store(p, a, b);
  } else {
    store_tail(p, n, a, b);
  }
}

// Tasks: row r, column tile c, numbered r * tiles + c.
struct Tiles {
  int64_t rows, cols, count_per_row;
  Tiles(int64_t r, int64_t c) : rows(r), cols(c), count_per_row((c + kTile - 1) / kTile) {}
  int64_t grain() const { return std::max<int64_t>(1, kParallelGrain / std::min(kTile, std::max<int64_t>(cols, 1))); }
};

// The element-wise kernels' parallel region: f(r, j0, j1) for row r's columns [j0, j1), one task per
// (row, column tile).
template <typename F>
void parallel_tiles(int64_t rows, int64_t cols, const F& f) {
  const Tiles tiles(rows, cols);
  if (tiles.count_per_row == 0) return;
  at::parallel_for(0, rows * tiles.count_per_row, tiles.grain(), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / tiles.count_per_row, j0 = (t % tiles.count_per_row) * kTile;
      f(r, j0, std::min(cols, j0 + kTile));
    }
  });
}

template <typename T, typename P, GeluApproximation A>
void bias_gelu_forward(const BiasGeluForwardArgs& a) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kB = block_size<Acc>();
  const P* bias = static_cast<const P*>(a.bias);
  parallel_tiles(a.rows, a.cols, [&](int64_t r, int64_t j0, int64_t j1) {
    const T* x = static_cast<const T*>(a.x) + r * a.cols;
    T* y = static_cast<T*>(a.y) + r * a.cols;
    for_blocks<kB>(j0, j1, [&](int64_t j, int64_t n) {
      V p, q;
      load_n(x + j, n, p, q);
      if (bias != nullptr) {  // h = x + bias
        V bp, bq;
        load_n(bias + j, n, bp, bq);
        p = p + bp;
        q = q + bq;
      }
      store_n(y + j, n, Gelu<Acc>::template value<A>(p), Gelu<Acc>::template value<A>(q));
    });
  });
}

template <typename T, typename P, GeluApproximation A>
void bias_gelu_backward(const BiasGeluBackwardArgs& a) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kB = block_size<Acc>();
  const P* bias = static_cast<const P*>(a.bias);
  const bool dbias = a.dbias != nullptr;
  const Tiles tiles(a.rows, a.cols);
  // NOTE [deterministic column sums] (rowwise.h): tasks are (row block, column tile); each adds its
  // rows' dx into its block's partial row.
  const RowBlocks blocks(a.rows, a.cols);
  std::vector<Acc> partial(dbias ? blocks.count * a.cols : 0, Acc(0));
  const int64_t tasks = blocks.count * tiles.count_per_row;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles.count_per_row, j0 = (t % tiles.count_per_row) * kTile;
      const int64_t j1 = std::min(a.cols, j0 + kTile);
      Acc* acc = dbias ? partial.data() + b * a.cols : nullptr;
      for (int64_t r = blocks.begin(b); r < blocks.end(b); ++r) {
        const T* x = static_cast<const T*>(a.x) + r * a.cols;
        const T* dy = static_cast<const T*>(a.dy) + r * a.cols;
        T* dx = static_cast<T*>(a.dx) + r * a.cols;
        for_blocks<kB>(j0, j1, [&](int64_t j, int64_t n) {
          V p, q, dp, dq;
          load_n(x + j, n, p, q);
          load_n(dy + j, n, dp, dq);
          if (bias != nullptr) {
            V bp, bq;
            load_n(bias + j, n, bp, bq);
            p = p + bp;
            q = q + bq;
          }
          // dx = dy * gelu'(x + bias); dbias sums it before rounding
          const V op = dp * Gelu<Acc>::template derivative<A>(p);
          const V oq = dq * Gelu<Acc>::template derivative<A>(q);
          store_n(dx + j, n, op, oq);
          if (acc != nullptr) {
            V ap, aq;
            load_n(acc + j, n, ap, aq);
            store_n(acc + j, n, ap + op, aq + oq);
          }
        });
      }
    }
  });
  if (dbias) sum_partials(partial.data(), blocks.count, a.cols, a.cols, static_cast<P*>(a.dbias));
}

// sigmoid(g) = 1 / (1 + exp(-g)), from e = exp(-|g|) <= 1 so that nothing overflows.
template <typename Acc>
inline Vectorized<Acc> sigmoid(const Vectorized<Acc>& g) {
  using V = Vectorized<Acc>;
  const V e = Elementary<Acc>::exp_nonpositive(V(Acc(0)) - g.abs());
  const V d = V(Acc(1)) / (V(Acc(1)) + e);
  return V::blendv(d, e * d, g < V(Acc(0)));
}

template <typename T>
void swiglu_forward(const SwigluForwardArgs& a) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kB = block_size<Acc>();
  parallel_tiles(a.rows, a.cols, [&](int64_t r, int64_t j0, int64_t j1) {
    const T* gate = static_cast<const T*>(a.gate) + r * a.gate_stride;
    const T* up = static_cast<const T*>(a.up) + r * a.up_stride;
    T* y = static_cast<T*>(a.y) + r * a.cols;
    for_blocks<kB>(j0, j1, [&](int64_t j, int64_t n) {
      V gp, gq, up_, uq;
      load_n(gate + j, n, gp, gq);
      load_n(up + j, n, up_, uq);
      // y = gate * sigmoid(gate) * up
      store_n(y + j, n, gp * sigmoid(gp) * up_, gq * sigmoid(gq) * uq);
    });
  });
}

template <typename T>
void swiglu_backward(const SwigluBackwardArgs& a) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kB = block_size<Acc>();
  parallel_tiles(a.rows, a.cols, [&](int64_t r, int64_t j0, int64_t j1) {
    const T* gate = static_cast<const T*>(a.gate) + r * a.gate_stride;
    const T* up = static_cast<const T*>(a.up) + r * a.up_stride;
    const T* dy = static_cast<const T*>(a.dy) + r * a.cols;
    T* dgate = static_cast<T*>(a.dgate) + r * a.grad_stride;
    T* dup = static_cast<T*>(a.dup) + r * a.grad_stride;
    for_blocks<kB>(j0, j1, [&](int64_t j, int64_t n) {
      V gp, gq, up_, uq, dp, dq;
      load_n(gate + j, n, gp, gq);
      load_n(up + j, n, up_, uq);
      load_n(dy + j, n, dp, dq);
      // s = sigmoid(gate): dup = dy * gate * s;  dgate = dy * up * s * (1 + gate * (1 - s))
      const V sp = sigmoid(gp), sq = sigmoid(gq);
      const V one(Acc(1));
      store_n(dup + j, n, dp * gp * sp, dq * gq * sq);
      store_n(dgate + j, n, dp * up_ * sp * (one + gp * (one - sp)), dq * uq * sq * (one + gq * (one - sq)));
    });
  });
}

template <typename F>
inline void dispatch_approximation(GeluApproximation approximate, const F& f) {
  if (approximate == GeluApproximation::TANH) {
    f(std::integral_constant<GeluApproximation, GeluApproximation::TANH>{});
  } else {
    f(std::integral_constant<GeluApproximation, GeluApproximation::NONE>{});
  }
}

}  // namespace

void bias_gelu_forward_kernel(const BiasGeluForwardArgs& a) {
  dispatch_pair(a.dtype, a.bias_dtype, [&](auto t, auto p) {
    dispatch_approximation(a.approximate, [&](auto approx) {
      bias_gelu_forward<typename decltype(t)::type, typename decltype(p)::type, decltype(approx)::value>(a);
    });
  });
}

void bias_gelu_backward_kernel(const BiasGeluBackwardArgs& a) {
  dispatch_pair(a.dtype, a.bias_dtype, [&](auto t, auto p) {
    dispatch_approximation(a.approximate, [&](auto approx) {
      bias_gelu_backward<typename decltype(t)::type, typename decltype(p)::type, decltype(approx)::value>(a);
    });
  });
}

void swiglu_forward_kernel(const SwigluForwardArgs& a) {
  dispatch_pair(a.dtype, a.dtype, [&](auto t, auto) { swiglu_forward<typename decltype(t)::type>(a); });
}

void swiglu_backward_kernel(const SwigluBackwardArgs& a) {
  dispatch_pair(a.dtype, a.dtype, [&](auto t, auto) { swiglu_backward<typename decltype(t)::type>(a); });
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
