#pragma once
// Softmax cross-entropy over the rows of a logits matrix, the loss and its gradient in one call
// (contract and reference: pyeff/ops/cross_entropy.py). Per row r with target t = target[r]:
//
//   m = max_c x_c,  s = sum_c exp(x_c - m),  lse = m + log s
//   loss_r = (1 - eps) w_t (lse - x_t) + eps / C * sum_c w_c (lse - x_c)
//   grad_rc = grad_scale * (softmax_c ((1 - eps) w_t + eps W / C) - eps / C w_c - (1 - eps) w_t [c == t])
//
// with W = sum_c w_c (w = 1 without class weights). Rows whose target is ignore_index get loss 0 and
// a zero gradient row.
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/isa.h"

namespace pyeff::cpu {

struct CrossEntropyArgs {
  const void* logits;  // rows x classes, float32/float64/bfloat16/float16; columns contiguous
  c10::ScalarType dtype;
  int64_t logits_row_stride;
  const int64_t* target;     // rows; each checked to be ignore_index or in [0, classes)
  const void* class_weight;  // classes values of the opmath type (float, double for float64), or nullptr
  double weight_sum;         // W: sum of class_weight, or classes
  int64_t rows;
  int64_t classes;
  int64_t ignore_index;
  double label_smoothing;
  double grad_scale;
  void* row_losses;  // rows values of the opmath type
  // rows x classes of `dtype` or float32, columns contiguous; nullptr: no gradient. May be `logits`
  // itself (same dtype and strides): each element is read before it is overwritten.
  void* grad;
  c10::ScalarType grad_dtype;
  int64_t grad_row_stride;
};

PYEFF_ISA_DECLARE(void, cross_entropy_kernel, (const CrossEntropyArgs& args))

}  // namespace pyeff::cpu
