#pragma once
// Input checks shared by the op files. Every check names the op, the list and the index, and what
// was expected, and runs before anything is written.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpu/low_precision.h"

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace pyeff {

// The floating dtypes the kernels take; the low precisions among them compute in fp32 (opmath),
// fp64 in fp64.
inline bool is_floating(c10::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf;
}
inline bool is_low_precision(c10::ScalarType dt) { return dt == at::kBFloat16 || dt == at::kHalf; }
inline c10::ScalarType opmath_type(c10::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// `name...` (the tensor's name, pieces joined) has one of the dtypes of is_floating.
template <typename... Name>
inline void check_floating(const char* op, c10::ScalarType dt, const Name&... name) {
  TORCH_CHECK(is_floating(dt), op, ": expected ", name..., " to be float32, float64, bfloat16 or float16, got ", dt);
}

// A per-column parameter of a row-wise op (a bias, a norm's weight): the input's dtype, or float32
// for bfloat16/float16 input.
inline void check_param_dtype(const char* op, const char* name, c10::ScalarType dt, c10::ScalarType input) {
  const bool low = is_low_precision(input);
  TORCH_CHECK(dt == input || (low && dt == at::kFloat), op, ": expected ", name, " to be ", input,
              low ? " or float32" : "", " like the input, got ", dt);
}
inline void check_length(const char* op, const char* name, at::TensorList list, size_t expected) {
  TORCH_CHECK(list.size() == expected, op, ": expected ", name, " to hold ", expected,
              " tensors (one per parameter), got ", list.size());
}

// `t` must be laid out exactly like `like` (same shape and strides, non-overlapping and dense), so
// that both can be walked as one flat array. pyeff.ops makes other layouts dense before calling.
inline void check_same_layout(const char* op, const char* name, size_t i, const at::Tensor& t,
                              const at::Tensor& like, c10::ScalarType dtype, c10::DeviceType device) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.device().type() == device, op, ": expected ", name, "[", i, "] on ", device, ", got ",
              t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": expected ", name, "[", i, "] on ", like.device(),
              " like its parameter, got ", t.device());
  TORCH_CHECK(!t.is_sparse(), op, ": ", name, "[", i, "] is sparse; this op takes dense tensors");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": expected ", name, "[", i, "] to be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": expected ", name, "[", i, "] of shape ", like.sizes(),
              " like its parameter, got ", t.sizes());
  TORCH_CHECK(t.is_non_overlapping_and_dense() && (t.numel() <= 1 || t.strides() == like.strides()),
              op, ": expected ", name, "[", i, "] to be dense with the strides of its parameter ",
              like.strides(), ", got ", t.strides());
}

// Prefix sums of numels: the flat index space that one parallel region walks.
inline std::vector<int64_t> numel_offsets(at::TensorList tensors) {
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) offsets[i + 1] = offsets[i] + tensors[i].numel();
  return offsets;
}

// An argument's name in an error message: `name`, or `name[index]` for an element of a list. Built
// only when a check fails (a step checks every parameter's tensors: nothing is allocated for them).
struct ArgName {
  ArgName(const char* name, int64_t index = -1) : name(name), index(index) {}  // NOLINT: from a literal
  const char* name;
  int64_t index;
};

inline std::ostream& operator<<(std::ostream& os, const ArgName& a) {
  os << a.name;
  if (a.index >= 0) os << "[" << a.index << "]";
  return os;
}

// A one-element float32 (or, with `fp64_ok`, float64) tensor on `device`: a step count, a flag, a
// scale, a learning rate.
inline void check_scalar(const char* op, const ArgName& name, const at::Tensor& t, const c10::Device& device,
                         bool fp64_ok = true, int64_t numel = 1) {
  TORCH_CHECK(t.numel() == numel, op, ": expected ", name, " to have ",
              numel == 1 ? std::string("one element") : std::to_string(numel) + " elements", ", got ", t.numel());
  TORCH_CHECK(t.device() == device, op, ": expected ", name, " on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || (fp64_ok && t.scalar_type() == at::kDouble), op, ": expected ",
              name, fp64_ok ? " to be float32 or float64, got " : " to be float32, got ", t.scalar_type());
}

// A one-element fp32/fp64 CPU tensor read on the host (a step count, a flag, a scale).
inline double host_scalar(const char* op, const char* name, const at::Tensor& t) {
  check_scalar(op, name, t, c10::Device(c10::DeviceType::CPU));
  return t.scalar_type() == at::kFloat ? *t.const_data_ptr<float>() : *t.const_data_ptr<double>();
}

// The optimizer ops: floating parameters; gradients of the parameters' dtype or, for fp32/bf16/fp16
// parameters, any of fp32/bf16/fp16.
inline void check_optimizer_dtypes(const char* op, c10::ScalarType dtype, c10::ScalarType grad_dtype) {
  TORCH_CHECK(is_floating(dtype), op, ": expected floating-point parameters (float32, float64, bfloat16, float16), got ", dtype);
  const bool reduced = dtype != at::kDouble;
  TORCH_CHECK(grad_dtype == dtype || (reduced && (grad_dtype == at::kFloat || grad_dtype == at::kBFloat16 ||
                                                  grad_dtype == at::kHalf)),
              op, ": expected grads of dtype ", dtype, (reduced ? " (or float32/bfloat16/float16)" : ""), ", got ",
              grad_dtype);
}

// The optimizer ops' low-precision state lists (NOTE [low-precision parameter modes]): the mode that
// the given lists select, their lengths, their per-parameter layouts, and what the kernels take.
struct LowPrecisionState {
  cpu::PrecisionMode mode;
  at::TensorList masters, comps;

  LowPrecisionState(const char* op, at::TensorList params, at::TensorList master_params,
                    at::TensorList compensations)
      : mode(cpu::PrecisionMode::PLAIN), masters(master_params), comps(compensations) {
    TORCH_CHECK(masters.empty() || comps.empty(), op,
                ": `master_params` and `compensations` cannot both be given; choose master weights or "
                "compensated summation");
    if (!masters.empty() || !comps.empty()) {
      const auto dtype = params.empty() ? at::kBFloat16 : params[0].scalar_type();
      TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, op,
                  ": master weights and compensated summation are for bfloat16/float16 parameters, got ", dtype);
      mode = masters.empty() ? cpu::PrecisionMode::KAHAN : cpu::PrecisionMode::MASTER;
    }
    check_length(op, "master_params", masters, mode == cpu::PrecisionMode::MASTER ? params.size() : 0);
    check_length(op, "compensations", comps, mode == cpu::PrecisionMode::KAHAN ? params.size() : 0);
  }

  // The dtype of the optimizer's moments/sums: fp32 next to fp32 master weights, else the parameters'.
  c10::ScalarType state_dtype(c10::ScalarType dtype) const {
    return mode == cpu::PrecisionMode::MASTER ? at::kFloat : dtype;
  }

  void check(const char* op, size_t i, const at::Tensor& p, c10::ScalarType dtype) const {
    const auto device = p.device().type();
    if (mode == cpu::PrecisionMode::MASTER) check_same_layout(op, "master_params", i, masters[i], p, at::kFloat, device);
    if (mode == cpu::PrecisionMode::KAHAN) check_same_layout(op, "compensations", i, comps[i], p, dtype, device);
  }

  float* master(size_t i) const { return mode == cpu::PrecisionMode::MASTER ? masters[i].data_ptr<float>() : nullptr; }
  void* compensation(size_t i) const { return mode == cpu::PrecisionMode::KAHAN ? comps[i].data_ptr() : nullptr; }
};

// The optimizer ops' moments and their storage (NOTE [compressed optimizer state] in
// csrc/state_codec.h): fp64 parameters keep fp64 moments; the others store them as fp32, bf16,
// int8 block codes (int8 for a signed moment, uint8 for a non-negative one, each code list with a
// list of its blocks' fp32 absmax), or in their own dtype (not next to master weights). The first
// moment's dtype decides, every other moment follows. `rng_seeds`: none, or one per parameter
// (stochastic rounding, NOTE [random bits]).
struct StateFormat {
  c10::ScalarType moment_dtype = at::kFloat;  // the first moment's (Char: int8 codes)
  bool quantized = false;
  bool stochastic = false;

  StateFormat() = default;
  StateFormat(const char* op, const char* first_name, c10::ScalarType dtype, const LowPrecisionState& low,
              c10::ScalarType first, size_t n, at::IntArrayRef rng_seeds)
      : moment_dtype(first), quantized(first == at::kChar || first == at::kByte), stochastic(!rng_seeds.empty()) {
    if (dtype == at::kDouble) {
      TORCH_CHECK(first == at::kDouble, op, ": expected ", first_name, "[0] to be Double (float64 parameters keep "
                  "float64 state), got ", first);
    } else {
      const bool own = first == dtype && low.mode != cpu::PrecisionMode::MASTER;
      TORCH_CHECK(own || first == at::kFloat || first == at::kBFloat16 || quantized, op, ": expected ", first_name,
                  "[0] to be Float, BFloat16, int8 block codes",
                  (low.mode != cpu::PrecisionMode::MASTER && dtype != at::kFloat ? " or the parameters' dtype" : ""),
                  ", got ", first);
    }
    TORCH_CHECK(rng_seeds.empty() || rng_seeds.size() == n, op, ": expected rng_seeds to hold ", n,
                " seeds (one per parameter) or none, got ", rng_seeds.size());
    TORCH_CHECK(!stochastic || dtype != at::kHalf || low.mode != cpu::PrecisionMode::PLAIN, op,
                ": stochastic rounding (rng_seeds) rounds bfloat16 values; float16 parameters need master weights "
                "or compensated summation");
  }

  // A moment's storage dtype: codes are int8 for a signed moment, uint8 for a non-negative one.
  c10::ScalarType dtype_of(bool is_signed) const {
    return quantized ? (is_signed ? at::kChar : at::kByte) : moment_dtype;
  }
};

// The absmax of a coded moment's blocks: fp32, one per kQuantBlock elements, contiguous, on the
// parameter's device.
inline void check_absmax(const char* op, const char* name, size_t i, const at::Tensor& absmax, const at::Tensor& p,
                         int64_t block) {
  const int64_t blocks = (p.numel() + block - 1) / block;
  TORCH_CHECK(absmax.defined() && absmax.scalar_type() == at::kFloat && absmax.dim() == 1 &&
                  absmax.numel() == blocks && absmax.is_contiguous(),
              op, ": expected ", name, "[", i, "] to be a contiguous float32 vector of ", blocks, " block scales for ",
              p.numel(), " elements, got ", absmax.defined() ? c10::toString(absmax.scalar_type()) : "undefined",
              " ", absmax.defined() ? absmax.sizes() : at::IntArrayRef{});
  TORCH_CHECK(absmax.device() == p.device(), op, ": expected ", name, "[", i, "] on ", p.device(),
              " like its parameter, got ", absmax.device());
}

// The optimizer ops' loss scaling and clipping (pyeff/optim/_fused.py, NOTE [mixed-precision step]).
// NOTE [overflow skip]: a non-zero found_inf skips the whole step; parameters, every state tensor and
// the step counts stay bitwise unchanged.
struct GradScaling {
  bool skip = false;
  bool has_mult = false;
  double mult = 1.0;  // gradients are multiplied by this first (inverse loss scale x clip coefficient)
};

// The optimizer ops' control scalars, each optional: grad_mult and found_inf (float32) and lr_tensor
// (float32 or float64), one element each on the parameters' device.
inline void check_controls(const char* op, const c10::Device& device, const std::optional<at::Tensor>& grad_mult,
                           const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor) {
  if (grad_mult) check_scalar(op, "grad_mult", *grad_mult, device, false);
  if (found_inf) check_scalar(op, "found_inf", *found_inf, device, false);
  if (lr_tensor) check_scalar(op, "lr_tensor", *lr_tensor, device);
}

// The control scalars read on the host (CPU kernels; check_controls first).
inline GradScaling grad_scaling(const char* op, const std::optional<at::Tensor>& grad_mult,
                                const std::optional<at::Tensor>& found_inf) {
  GradScaling g;
  if (grad_mult.has_value()) {
    g.has_mult = true;
    g.mult = host_scalar(op, "grad_mult", *grad_mult);
  }
  g.skip = found_inf.has_value() && host_scalar(op, "found_inf", *found_inf) != 0;
  return g;
}

// The checks every optimizer op makes, after the caller checked the lengths of its own state lists:
// gradients and step counts one per parameter (an op without step counts passes nullopt), the
// dtypes, each parameter's device and layout, its gradient (check_grad(i, p, grad_dtype): an op that
// takes sparse gradients checks them its way), the storage of its moments (StateFormat, from
// `moments`: the list whose dtype decides it, and the seeds of stochastic rounding), its state
// tensors (check_state(i, p, format)), its low-precision state and step count, and the control
// scalars. Returns the dtypes, the low-precision mode and the state format.
struct OptimizerInputs {
  c10::ScalarType dtype, grad_dtype;
  LowPrecisionState low;
  StateFormat state;
};

struct MomentLists {
  const char* name;        // of `first`
  at::TensorList first;    // the first moment (empty: the op keeps none, its format is the default)
  at::IntArrayRef rng_seeds;
};

template <typename CheckGrad, typename CheckState>
OptimizerInputs check_optimizer_step(const char* op, at::TensorList params, at::TensorList grads,
                                     std::optional<at::TensorList> state_steps, at::TensorList master_params,
                                     at::TensorList compensations, const MomentLists& moments,
                                     const std::optional<at::Tensor>& grad_mult,
                                     const std::optional<at::Tensor>& found_inf,
                                     const std::optional<at::Tensor>& lr_tensor, const CheckGrad& check_grad,
                                     const CheckState& check_state) {
  const size_t n = params.size();
  check_length(op, "grads", grads, n);
  if (state_steps) check_length(op, "state_steps", *state_steps, n);
  OptimizerInputs in{at::kFloat, at::kFloat, LowPrecisionState(op, params, master_params, compensations), {}};
  if (n == 0) return in;
  in.dtype = params[0].scalar_type();
  in.grad_dtype = grads[0].scalar_type();
  check_optimizer_dtypes(op, in.dtype, in.grad_dtype);
  const auto first = moments.first.empty() ? in.low.state_dtype(in.dtype) : moments.first[0].scalar_type();
  in.state = StateFormat(op, moments.name, in.dtype, in.low, first, n, moments.rng_seeds);
  const auto device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    check_same_layout(op, "params", i, p, p, in.dtype, device.type());
    TORCH_CHECK(p.device() == device, op, ": expected params[", i, "] on ", device, " like params[0], got ",
                p.device());
    check_grad(i, p, in.grad_dtype);
    check_state(i, p, in.state);
    in.low.check(op, i, p, in.dtype);
    if (state_steps) check_scalar(op, {"state_steps", static_cast<int64_t>(i)}, (*state_steps)[i], device);
  }
  check_controls(op, device, grad_mult, found_inf, lr_tensor);
  return in;
}

// After the kernel: each step count becomes the value host_scalar read before it, plus one (written
// without a dispatcher round trip).
inline void advance_steps(at::TensorList state_steps, const std::vector<double>& before) {
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const auto& t = state_steps[i];
    if (t.scalar_type() == at::kFloat) {
      *t.data_ptr<float>() = static_cast<float>(before[i] + 1);
    } else {
      *t.data_ptr<double>() = before[i] + 1;
    }
  }
}

// What autograd's in-place bookkeeping does for ATen's own in-place ops: a tensor written by a kernel
// gets a new version, so a later backward through a stale saved value raises instead of being wrong.
inline void bump_versions(std::initializer_list<at::TensorList> lists) {
  for (const auto& list : lists) {
    for (const auto& t : list) {
      if (t.is_inference()) continue;  // inference tensors have no version counter
      t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

}  // namespace pyeff
