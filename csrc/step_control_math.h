#pragma once
// step_control's math on one thread, host or device (contract: pyeff/ops/step_control.py): the
// scalars that steer one mixed-precision step, in fp32 in the contract's order.
#include <c10/macros/Macros.h>

#include <cmath>

namespace pyeff {

constexpr float kClipEps = 1e-6f;  // clip_grad_norm_'s max_norm / (total_norm + 1e-6)

// stats: [sum of squares, any non-finite] or null; grad_scale, found_inf: one element or null;
// out: [grad_mult, found_inf, grad_norm, 0].
C10_HOST_DEVICE inline void step_control_math(const float* stats, const float* grad_scale, const float* found_inf,
                                              float max_grad_norm, float* out) {
  // torch.amp.GradScaler.unscale_: the reciprocal in double, rounded to fp32
  const float inv_scale = grad_scale ? static_cast<float>(1.0 / static_cast<double>(*grad_scale)) : 1.f;
  float found = found_inf ? *found_inf : 0.f;
  float norm = 0.f;
  if (stats) {
    found = (found != found || stats[1] != stats[1]) ? NAN : (found < stats[1] ? stats[1] : found);
    norm = ::sqrtf(stats[0]) * inv_scale;
  }
  float mult = inv_scale;
  if (max_grad_norm > 0) {
    // max_norm / (total_norm + 1e-6) as torch evaluates a Python float over a tensor: reciprocal, then product
    float clip = (1.f / (norm + kClipEps)) * max_grad_norm;
    if (clip > 1.f) clip = 1.f;  // clamp(max=1); a NaN norm stays NaN
    mult = inv_scale * clip;
  }
  out[0] = mult;
  out[1] = found;
  out[2] = norm;
  out[3] = 0.f;
}

}  // namespace pyeff
