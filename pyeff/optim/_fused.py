"""What pyeff's optimizers share: input checks, the mixed-precision prologue, checkpoints.

NOTE [mixed-precision step]
A step makes at most two passes over memory. When a loss scale must be checked or gradients
clipped, one read-only pass (pyeff.ops.grad_stats) yields the non-finite flag and the global norm
of all the optimizer's gradients. From those two numbers, still on the device (no host sync),
come `found_inf` and one gradient multiplier, inverse loss scale x clip coefficient; the fused
update applies the multiplier in registers and skips the whole step when found_inf is set
(NOTE [overflow skip]). Gradients are never written.

- torch.amp.GradScaler sets `grad_scale` and `found_inf` on optimizers that declare
  `_step_supports_amp_scaling` (it has already made its own overflow pass);
- pyeff.amp.GradScaler sets only `grad_scale`, and the optimizer's pass finds the overflow;
- `max_grad_norm=` asks for the norm pass even without a scaler, and then a non-finite gradient
  skips the step too (rather than writing NaN into every parameter, as clip_grad_norm_ would).
- `grad_stats_provider`, when set (by pyeff.distributed's DDP comm hook), may hand over those two
  numbers for exactly this step's gradients, computed while they were all-reduced; the read pass
  is then skipped (NOTE [grad stats during the all-reduce] in pyeff/distributed/comm_hook.py).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..ops._registry import BACKENDS
from ..ops.grad_stats import grad_stats
from . import _dtensor

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Parameter and gradient dtypes that may differ (torch >= 2.9 allows it through `param.grad_dtype`).
_MIXABLE = (torch.float32, torch.bfloat16, torch.float16)


class FusedOptimizer(Optimizer):
    """Base of pyeff.optim's optimizers. Subclasses implement `_init_group` (lazy state, the lists
    the op takes) and `_update` (one op call per group)."""

    _step_supports_amp_scaling = True
    _supports_sparse_grads = False

    def __init__(self, params, defaults: dict, *, max_grad_norm: float | None, backend: str | None):
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; expected one of {', '.join(BACKENDS)}")
        if defaults.get("master_weights") and defaults.get("kahan_summation"):
            raise RuntimeError("`master_weights` and `kahan_summation` cannot both be True: use fp32 master "
                               "weights, or compensated summation without them")
        if defaults.get("differentiable") and (defaults.get("master_weights") or defaults.get("kahan_summation")):
            raise RuntimeError("`differentiable` does not support `master_weights` or `kahan_summation`")
        self.max_grad_norm = max_grad_norm
        self.backend = backend
        # Set by every step: whether it was skipped for a non-finite gradient (a bool tensor on the
        # gradients' device, so reading it is the only sync), and the global gradient norm when
        # max_grad_norm is set (unscaled, as clip_grad_norm_ returns it).
        self.last_step_skipped: Tensor | None = None
        self.grad_norm: Tensor | None = None
        # grads -> float32 [sum of squares, non-finite] for exactly these gradients, or None.
        self.grad_stats_provider = None
        super().__init__(params, defaults)
        # torch.optim's checks, after its own construction as there (always fused here, so accepted)
        if defaults.get("fused"):
            if defaults.get("differentiable"):
                raise RuntimeError("`fused` does not support `differentiable`")
            if defaults.get("foreach"):
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    # -- pickling: Optimizer.__getstate__ keeps only defaults, state and param_groups
    def __getstate__(self):
        state = super().__getstate__()
        state.update(max_grad_norm=self.max_grad_norm, backend=self.backend)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("last_step_skipped", None)
        self.__dict__.setdefault("grad_norm", None)
        self.__dict__.setdefault("grad_stats_provider", None)
        for group in self.param_groups:
            group.setdefault("master_weights", False)
            group.setdefault("kahan_summation", False)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32, device=p.device)

    # -- subclass interface
    def _init_group(self, group: dict) -> list[dict[str, list[Tensor]]]:
        """Create missing state; return the argument lists of each op call the group needs."""
        raise NotImplementedError

    def _update(self, group: dict, lists: dict[str, list[Tensor]], grad_mult: Tensor | None,
                found_inf: Tensor | None) -> None:
        raise NotImplementedError

    def _validate_group(self, group: dict) -> None:
        """Hyper-parameter checks repeated at every step (groups can be edited after construction)."""

    # -- the step
    def _check_inputs(self) -> None:
        """Every check that can fail, before any parameter or state is written."""
        name = type(self).__name__
        for group in self.param_groups:
            self._validate_group(group)
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse and not self._supports_sparse_grads:
                    raise RuntimeError(f"{name} does not support sparse gradients, please consider SparseAdam instead")
                if g.dtype != p.dtype and not (g.dtype in _MIXABLE and p.dtype in _MIXABLE):
                    raise RuntimeError(f"{name}: a gradient of dtype {g.dtype} for a parameter of dtype {p.dtype}; "
                                       "gradients must have their parameter's dtype (float32, bfloat16 and "
                                       "float16 parameters also take float32, bfloat16 or float16 gradients)")
                if g.device != p.device:
                    raise RuntimeError(f"{name}: a gradient on {g.device} for a parameter on {p.device}; "
                                       "gradients must be on their parameter's device")
                if g.shape != p.shape:
                    raise RuntimeError(f"{name}: a gradient of shape {tuple(g.shape)} for a parameter of shape "
                                       f"{tuple(p.shape)}")

    def _mixed_precision_prologue(self, grads: list[Tensor], shard_group=None) -> tuple[Tensor | None, Tensor | None]:
        """(grad_mult, found_inf) for the update; see NOTE [mixed-precision step]. With `shard_group`,
        `grads` are this rank's shards and the statistics are summed over the group (NOTE [DTensor
        parameters] in _dtensor.py)."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # The reciprocal in fp64, as torch.amp.GradScaler.unscale_ computes it.
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        grad_mult = inv_scale
        self.grad_norm = None
        if grads and (self.max_grad_norm is not None or (grad_scale is not None and found_inf is None)):
            stats = self.grad_stats_provider(grads) if self.grad_stats_provider is not None else None
            if stats is None:
                stats = grad_stats(grads, backend=self.backend)
                if shard_group is not None:
                    torch.distributed.all_reduce(stats, group=shard_group)
                    stats = torch.stack([stats[0], stats[1].clamp(max=1)])
            nonfinite = stats[1]
            found_inf = nonfinite if found_inf is None else torch.maximum(found_inf.to(stats.device), nonfinite)
            if self.max_grad_norm is not None:
                norm = stats[0].sqrt()
                if inv_scale is not None:
                    norm = norm * inv_scale.to(norm.device)
                self.grad_norm = norm
                # clip_grad_norm_: max_norm / (total_norm + 1e-6), clamped to 1
                clip = (self.max_grad_norm / (norm + 1e-6)).clamp_(max=1.0)
                grad_mult = clip if inv_scale is None else inv_scale.to(clip.device) * clip
        device = grads[0].device if grads else torch.device("cpu")
        self.last_step_skipped = (found_inf > 0) if found_inf is not None else torch.zeros((), dtype=torch.bool,
                                                                                           device=device)
        return grad_mult, found_inf

    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            self._check_inputs()
            calls = [(group, lists) for group in self.param_groups for lists in self._init_group(group)]
            shard_group = _dtensor.unwrap(calls)
            grad_mult, found_inf = self._mixed_precision_prologue([g for _, lists in calls for g in lists["grads"]],
                                                                  shard_group)
            for group, lists in calls:
                self._update(group, lists, grad_mult, found_inf)
        return loss

    # -- checkpoints
    def load_state_dict(self, state_dict) -> None:
        # torch.optim casts every floating state tensor to its parameter's dtype. Groups with fp32
        # master weights keep master and moments in fp32, so those are restored after.
        saved_groups = state_dict["param_groups"]
        keep = {}
        for group in saved_groups:
            if group.get("master_weights"):
                for idx in group["params"]:
                    for key, value in state_dict["state"].get(idx, {}).items():
                        if key != "step" and torch.is_tensor(value) and value.dtype == torch.float32:
                            keep[(idx, key)] = value
        super().load_state_dict(state_dict)
        if keep:
            index_to_param = dict(zip((i for g in saved_groups for i in g["params"]),
                                      (p for g in self.param_groups for p in g["params"])))
            for (idx, key), value in keep.items():
                p = index_to_param[idx]
                self.state[p][key] = value.to(device=p.device, copy=True)


def low_precision_mode(group: dict, p: Tensor) -> str:
    """'master', 'kahan' or 'plain' for parameter p; see NOTE [low-precision parameter modes]."""
    if p.dtype in LOW_PRECISION:
        if group["master_weights"]:
            return "master"
        if group["kahan_summation"]:
            return "kahan"
    return "plain"


def init_low_precision_state(group: dict, p: Tensor, state: dict, moment_keys: tuple[str, ...]) -> str:
    """Create (or, after loading a checkpoint of another mode, convert) the low-precision state of p."""
    mode = low_precision_mode(group, p)
    if mode == "master":
        if "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        for k in moment_keys:
            if k in state and state[k].dtype != torch.float32:
                state[k] = state[k].float()
    elif mode == "kahan" and "compensation" not in state:
        state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return mode


def append_low_precision_state(lists: dict[str, list[Tensor]], mode: str, state: dict) -> None:
    """Add a parameter's master weight or compensation buffer to its op call's lists."""
    if mode == "master":
        lists["master_params"].append(state["master_param"])
    elif mode == "kahan":
        lists["compensations"].append(state["compensation"])


def as_real(t: Tensor) -> Tensor:
    """torch.optim updates complex tensors as their real views."""
    return torch.view_as_real(t) if torch.is_complex(t) else t


def scalar(x) -> float:
    return x.item() if torch.is_tensor(x) else float(x)
