// Rows in parallel; each row in three passes: the max, then the sum of exp(x - max) (and the
// label-smoothing sum), then the gradient. A row of 32k fp32 logits is 128 KiB and stays in L2
// between the passes, so memory sees one read of the logits and one write of the gradient; the
// softmax itself is never stored. The last, partial block of a row goes through a padded stack
// buffer and the same vector operations as the body, so no result depends on where a row ends.
#include <limits>
#include <type_traits>

#include "cpu/cross_entropy_kernel.h"
#include "cpu/vec_utils.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

// The block [c, c + kBlock) of a row of n values as two opmath vectors; lanes past n read `pad`.
template <typename T, typename Acc>
inline void load_block(const T* row, int64_t c, int64_t n, Acc pad, Vectorized<Acc>& a, Vectorized<Acc>& b) {
  constexpr int64_t kBlock = block_size<Acc>();
  if (c + kBlock <= n) {
    Io<T>::load(row + c, a, b);
    return;
  }
  T buf[kBlock];
  for (int64_t k = 0; k < kBlock; ++k) buf[k] = c + k < n ? row[c + k] : static_cast<T>(pad);
  Io<T>::load(buf, a, b);
}

template <typename G, typename Acc>
inline void store_block(G* row, int64_t c, int64_t n, const Vectorized<Acc>& a, const Vectorized<Acc>& b) {
  constexpr int64_t kBlock = block_size<Acc>();
  if (c + kBlock <= n) {
    Io<G>::store(row + c, a, b);
    return;
  }
  G buf[kBlock];
  Io<G>::store(buf, a, b);
  for (int64_t k = 0; c + k < n; ++k) row[c + k] = buf[k];
}

// Zeroes the lanes of a partial block at or past `valid` (valid < kBlock).
template <typename Acc>
inline void keep_first(int64_t valid, Vectorized<Acc>& a, Vectorized<Acc>& b) {
  constexpr int64_t kHalf = Vectorized<Acc>::size();
  const Vectorized<Acc> zero(Acc(0));
  a = Vectorized<Acc>::set(zero, a, std::min(valid, kHalf));
  b = Vectorized<Acc>::set(zero, b, std::max<int64_t>(0, valid - kHalf));
}

template <typename Acc>
inline Acc reduce_max(const Vectorized<Acc>& v) {
  return at::vec::vec_reduce_all<Acc>([](Vectorized<Acc>& p, Vectorized<Acc>& q) { return at::vec::maximum(p, q); }, v);
}

template <typename Acc>
inline Acc reduce_sum(const Vectorized<Acc>& v) {
  return at::vec::vec_reduce_all<Acc>([](Vectorized<Acc>& p, Vectorized<Acc>& q) { return p + q; }, v);
}

// exp of one value through the vector exp, so the target's gradient matches its neighbours'.
template <typename Acc>
inline Acc vexp1(Acc x) {
  Acc out[Vectorized<Acc>::size()];
  Vectorized<Acc>(x).exp_u20().store(out);
  return out[0];
}

template <typename T, typename G, bool kWeighted, bool kSmooth>
void cross_entropy_rows(const CrossEntropyArgs& a, int64_t r0, int64_t r1) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kBlock = block_size<Acc>();
  const int64_t n = a.classes;
  const Acc* w = static_cast<const Acc*>(a.class_weight);
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  // Coefficients in double, as Python would compute them, then rounded once.
  const double eps = a.label_smoothing;
  const Acc keep = static_cast<Acc>(1.0 - eps);              // 1 - eps
  const Acc eps_c = static_cast<Acc>(eps / n);                // eps / C
  const Acc eps_wc = static_cast<Acc>(eps * a.weight_sum / n);  // eps W / C
  const Acc weight_sum = static_cast<Acc>(a.weight_sum);
  const Acc scale = static_cast<Acc>(a.grad_scale);

  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.logits) + r * a.logits_row_stride;
    G* g = a.grad == nullptr ? nullptr : static_cast<G*>(a.grad) + r * a.grad_row_stride;
    Acc& loss = static_cast<Acc*>(a.row_losses)[r];
    const int64_t t = a.target[r];
    if (t == a.ignore_index) {
      loss = Acc(0);
      if (g != nullptr) std::fill(g, g + n, G(0));
      continue;
    }

    // ---- pass 1: m = x.max() (NaN if any x is NaN)
    V m0(ninf), m1(ninf);
    for (int64_t c = 0; c < n; c += kBlock) {
      V xa, xb;
      load_block<T, Acc>(x, c, n, ninf, xa, xb);
      m0 = at::vec::maximum(m0, xa);
      m1 = at::vec::maximum(m1, xb);
    }
    const Acc m = reduce_max(at::vec::maximum(m0, m1));

    // ---- pass 2: s = exp(x - m).sum(); z = (w * (x - m)).sum() for label smoothing
    const V mv(m);
    V s0(Acc(0)), s1(Acc(0)), z0(Acc(0)), z1(Acc(0));
    for (int64_t c = 0; c < n; c += kBlock) {
      V xa, xb;
      load_block<T, Acc>(x, c, n, ninf, xa, xb);
      xa = xa - mv;
      xb = xb - mv;
      s0 = s0 + xa.exp_u20();
      s1 = s1 + xb.exp_u20();
      if constexpr (kSmooth) {
        if (c + kBlock > n) keep_first(n - c, xa, xb);  // padded lanes are -inf
        if constexpr (kWeighted) {
          V wa, wb;
          load_block<Acc, Acc>(w, c, n, Acc(0), wa, wb);
          xa = wa * xa;
          xb = wb * xb;
        }
        z0 = z0 + xa;
        z1 = z1 + xb;
      }
    }
    const Acc s = reduce_sum(s0 + s1);
    const Acc log_s = std::log(s);  // lse - m
    const Acc wt = kWeighted ? w[t] : Acc(1);
    const Acc xt = Io<T>::load1(x + t) - m;
    // -(1 - eps) w_t log p_t + eps / C * -sum_c w_c log p_c, with log p_c = (x_c - m) - log s
    Acc row_loss = keep * wt * (log_s - xt);
    if constexpr (kSmooth) row_loss = row_loss + eps_c * (weight_sum * log_s - reduce_sum(z0 + z1));
    loss = row_loss;
    if (g == nullptr) continue;

    // ---- pass 3: grad = scale * (p * ((1 - eps) w_t + eps W / C) - eps / C * w), p = exp(x - m) / s
    const Acc coef_p = scale * (keep * wt + eps_wc) / s;
    const V cp(coef_p), cw(scale * eps_c);
    for (int64_t c = 0; c < n; c += kBlock) {
      V xa, xb;
      load_block<T, Acc>(x, c, n, ninf, xa, xb);
      V ga = (xa - mv).exp_u20() * cp;
      V gb = (xb - mv).exp_u20() * cp;
      if constexpr (kSmooth) {
        V wa(Acc(1)), wb(Acc(1));
        if constexpr (kWeighted) load_block<Acc, Acc>(w, c, n, Acc(0), wa, wb);
        ga = ga - cw * wa;
        gb = gb - cw * wb;
      }
      store_block<G, Acc>(g, c, n, ga, gb);
    }
    // the target's element: minus scale * (1 - eps) w_t, rounded once
    Acc gt = vexp1(xt) * coef_p;
    if constexpr (kSmooth) gt = gt - scale * eps_c * wt;
    Io<G>::store1(g + t, gt - scale * keep * wt);
  }
}

template <typename T, typename G>
void dispatch_flags(const CrossEntropyArgs& a, int64_t r0, int64_t r1) {
  const bool weighted = a.class_weight != nullptr;
  const bool smooth = a.label_smoothing > 0;
  if (weighted && smooth) return cross_entropy_rows<T, G, true, true>(a, r0, r1);
  if (weighted) return cross_entropy_rows<T, G, true, false>(a, r0, r1);
  if (smooth) return cross_entropy_rows<T, G, false, true>(a, r0, r1);
  return cross_entropy_rows<T, G, false, false>(a, r0, r1);
}

template <typename T>
void dispatch_grad(const CrossEntropyArgs& a, int64_t r0, int64_t r1) {
  // Without a gradient the G type is unused; the grad dtype is then the logits dtype.
  if (a.grad != nullptr && a.grad_dtype == c10::ScalarType::Float && a.dtype != c10::ScalarType::Float) {
    if constexpr (!std::is_same_v<T, double>) return dispatch_flags<T, float>(a, r0, r1);
  }
  return dispatch_flags<T, T>(a, r0, r1);
}

}  // namespace

void cross_entropy_kernel(const CrossEntropyArgs& a) {
  if (a.rows == 0) return;
  // About 16k elements per task: big rows go one per thread, small rows in bunches.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.classes));
  at::parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    switch (a.dtype) {
      case c10::ScalarType::Float: return dispatch_grad<float>(a, r0, r1);
      case c10::ScalarType::Double: return dispatch_grad<double>(a, r0, r1);
      case c10::ScalarType::BFloat16: return dispatch_grad<c10::BFloat16>(a, r0, r1);
      case c10::ScalarType::Half: return dispatch_grad<c10::Half>(a, r0, r1);
      default: return;  // rejected by csrc/cross_entropy.cpp
    }
  });
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
