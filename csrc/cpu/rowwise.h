#pragma once
// Helpers shared by the row-wise kernels (norm_kernel.cpp, activation_kernel.cpp): fixed row blocks
// for deterministic column sums, and partial blocks for the tail of a row. Like vec_utils.h, this is
// compiled once per ISA inside that ISA's namespace.
#include "cpu/vec_utils.h"
#include "type_tag.h"

namespace pyeff::cpu::CPU_CAPABILITY {

// NOTE [deterministic column sums]
// The gradients of per-column parameters (a norm's weight and bias, the bias before GELU) are sums
// over rows. Rows are cut into blocks whose number depends only on the shape, never on the thread
// count; each block sums its rows into its own partial row (fp32, fp64 for fp64 input), and the
// partials are then added in block order. Results are the same bits on any number of threads, and
// no atomics are needed. The partials cost kMaxBlocks x cols opmath values, whatever the row count.
struct RowBlocks {
  static constexpr int64_t kMaxBlocks = 32;
  static constexpr int64_t kMinElemsPerBlock = 16384;  // below this a block is not worth a thread
  int64_t rows, rows_per_block, count;

  RowBlocks(int64_t rows_, int64_t cols) : rows(rows_) {
    rows_per_block = std::max<int64_t>({int64_t(1), (rows + kMaxBlocks - 1) / kMaxBlocks,
                                        kMinElemsPerBlock / std::max<int64_t>(cols, 1)});
    count = (rows + rows_per_block - 1) / rows_per_block;
  }
  int64_t begin(int64_t b) const { return b * rows_per_block; }
  int64_t end(int64_t b) const { return std::min(rows, (b + 1) * rows_per_block); }
};

// out[j] = sum over b < blocks of partial[b * stride + j], added in block order, for j < cols; stored
// as P (rounded once). A second, short parallel region: its size does not grow with the row count.
template <typename P, typename Acc>
void sum_partials(const Acc* partial, int64_t blocks, int64_t stride, int64_t cols, P* out) {
  constexpr int64_t kCols = 1024;
  at::parallel_for(0, (cols + kCols - 1) / kCols, 4, [&](int64_t c0, int64_t c1) {
    Acc acc[kCols];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j0 = c * kCols, n = std::min(kCols, cols - j0);
      std::fill(acc, acc + n, Acc(0));
      for (int64_t b = 0; b < blocks; ++b) {
        const Acc* p = partial + b * stride + j0;
        for (int64_t j = 0; j < n; ++j) acc[j] += p[j];
      }
      for (int64_t j = 0; j < n; ++j) Io<P>::store1(out + j0 + j, acc[j]);
    }
  });
}

// The last n < block elements of a row as a zero-padded block, so that the tail runs the vector
// code of the body: the same operations on the same lanes (transcendentals included).
template <typename T, typename V>
inline void load_tail(const T* p, int64_t n, V& a, V& b) {
  T buf[2 * V::size()] = {};
  std::copy(p, p + n, buf);
  Io<T>::load(buf, a, b);
}

template <typename T, typename V>
inline void store_tail(T* p, int64_t n, const V& a, const V& b) {
  T buf[2 * V::size()];
  Io<T>::store(buf, a, b);
  std::copy(buf, buf + n, p);
}

// Calls f(TypeTag<T>, TypeTag<P>) for the (input dtype, parameter dtype) pairs the row-wise ops
// accept: P is T, or float for bfloat16/float16 input. The op files reject every other pair before
// calling.
template <typename F>
inline void dispatch_pair(c10::ScalarType dtype, c10::ScalarType param_dtype, const F& f) {
  using c10::ScalarType;
  const bool fp32_param = param_dtype == ScalarType::Float;
  switch (dtype) {
    case ScalarType::Float: return f(TypeTag<float>{}, TypeTag<float>{});
    case ScalarType::Double: return f(TypeTag<double>{}, TypeTag<double>{});
    case ScalarType::BFloat16:
      return fp32_param ? f(TypeTag<c10::BFloat16>{}, TypeTag<float>{})
                        : f(TypeTag<c10::BFloat16>{}, TypeTag<c10::BFloat16>{});
    case ScalarType::Half:
      return fp32_param ? f(TypeTag<c10::Half>{}, TypeTag<float>{}) : f(TypeTag<c10::Half>{}, TypeTag<c10::Half>{});
    default: return;
  }
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
