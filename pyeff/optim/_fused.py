"""What pyeff's optimizers share: input checks, the mixed-precision prologue, checkpoints.

NOTE [mixed-precision step]
A step makes at most two passes over memory. When a loss scale must be checked or gradients
clipped, one read-only pass (pyeff.ops.grad_stats) yields the non-finite flag and the global norm
of all the optimizer's gradients. From those two numbers, still on the device (no host sync),
pyeff.ops.step_control computes `found_inf` and one gradient multiplier, inverse loss scale x clip
coefficient; the fused update applies the multiplier in registers and skips the whole step when
found_inf is set (NOTE [overflow skip]). Gradients are never written. The statistics and the
control scalars live in two small buffers per device made at the first step, so that later steps
allocate nothing and a whole iteration can be captured in a CUDA graph.

- torch.amp.GradScaler sets `grad_scale` and `found_inf` on optimizers that declare
  `_step_supports_amp_scaling` (it has already made its own overflow pass);
- pyeff.amp.GradScaler sets only `grad_scale`, and the optimizer's pass finds the overflow;
- `max_grad_norm=` asks for the norm pass even without a scaler, and then a non-finite gradient
  skips the step too (rather than writing NaN into every parameter, as clip_grad_norm_ would).
- `grad_stats_provider`, when set (by pyeff.distributed's DDP comm hook), may hand over the
  statistics of exactly this step's gradients, computed while they were all-reduced; the read pass
  is then skipped (NOTE [grad stats during the all-reduce] in pyeff/distributed/comm_hook.py).
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..ops._multi_tensor import on_device
from ..ops._registry import BACKENDS
from ..ops.grad_stats import grad_stats
from ..ops.step_control import step_control
from . import _dtensor, _state
from ._plan import StepPlan

LOW_PRECISION = (torch.bfloat16, torch.float16)
# The device types pyeff has fused (compiled or Triton) kernels for; others get the reference.
FUSED_DEVICES = ("cpu", "cuda")
# Parameter and gradient dtypes that may differ (torch >= 2.9 allows it through `param.grad_dtype`).
_MIXABLE = (torch.float32, torch.bfloat16, torch.float16)


class _StepBuffers:
    """One device's statistics and control scalars (NOTE [mixed-precision step]), with the views
    the update reads, made once."""

    def __init__(self, device: torch.device):
        self.stats = torch.zeros(2, dtype=torch.float32, device=device)
        self.control = torch.zeros(4, dtype=torch.float32, device=device)
        self.grad_mult, self.found_inf, self.grad_norm = self.control[0], self.control[1], self.control[2]


class FusedOptimizer(Optimizer):
    """Base of pyeff.optim's optimizers. Subclasses name the argument lists of their op (`_LISTS`),
    and implement `_init_param` (lazy state of one parameter, appended to those lists by
    `_init_group`, as torch.optim's `_init_group` does, so that torch.compile runs it once and guards
    on the state) and `_fused_update`/`_differentiable_update` (one call per group)."""

    _step_supports_amp_scaling = True
    _supports_sparse_grads = False
    _LISTS: tuple[str, ...] = ()
    _MOMENTS: tuple[tuple[str, bool], ...] = ()  # (state key, signed) of the moments (NOTE [state formats])
    # Group keys that older checkpoints may lack, with the values torch.optim's __setstate__ gives them.
    _GROUP_DEFAULTS: dict[str, object] = {}
    # Group settings that decide which state a parameter has and what goes into the lists (NOTE [step plans]).
    _PLAN_KEYS: tuple[str, ...] = ("differentiable", "fused", "master_weights", "kahan_summation", "state_dtype",
                                   "stochastic_rounding", "seed")

    def __init__(self, params, defaults: dict, *, max_grad_norm: float | None, backend: str | None):
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; expected one of {', '.join(BACKENDS)}")
        if defaults.get("master_weights") and defaults.get("kahan_summation"):
            raise RuntimeError("`master_weights` and `kahan_summation` cannot both be True: use fp32 master "
                               "weights, or compensated summation without them")
        _check_differentiable(defaults)
        _state.check_state_args(defaults.get("state_dtype"), defaults.get("stochastic_rounding"),
                                defaults.get("differentiable"))
        if defaults.get("stochastic_rounding") and defaults.get("seed") is None:
            defaults["seed"] = _state.draw_seed()
        self.max_grad_norm = max_grad_norm
        self.backend = backend
        # NOTE [step buffers]: made outside the traced part of a step (in _init_group, which
        # torch.compile runs eagerly), and what the last step used, kept in a dict that is updated in
        # place (torch.compile replays that, but not attribute assignments on an optimizer).
        self._buffers: dict[torch.device, _StepBuffers] = {}
        self._last_step: dict[str, object] = {}
        self._plans: dict[int, StepPlan] = {}  # id(group) -> its step plan (NOTE [step plans])
        # grads -> float32 [sum of squares, non-finite] of exactly these gradients, or None.
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
        self.__dict__.setdefault("_buffers", {})
        self.__dict__.setdefault("_last_step", {})
        self.__dict__["_plans"] = {}
        self.__dict__.setdefault("grad_stats_provider", None)
        for group in self.param_groups:
            for key, value in self._GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            group.setdefault("master_weights", False)
            group.setdefault("kahan_summation", False)
            if "state_dtype" in self.defaults:  # optimizers with compressed state (not SGD)
                group.setdefault("state_dtype", None)
                group.setdefault("stochastic_rounding", False)
                group.setdefault("seed", None)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32, device=p.device)

    # -- what the last step did
    @property
    def last_step_skipped(self) -> Tensor | None:
        """Whether the last step was skipped for a non-finite gradient: a bool tensor on the
        gradients' device (reading its value is the only sync), None before the first step."""
        if not self._last_step:
            return None
        buffers = self._last_step["buffers"]
        if buffers is None:
            return torch.zeros((), dtype=torch.bool, device=self._last_step["device"])
        return buffers.found_inf > 0

    @property
    def grad_norm(self) -> Tensor | None:
        """The global gradient norm of the last step when `max_grad_norm` is set (unscaled, as
        clip_grad_norm_ returns it), else None."""
        buffers = self._last_step.get("buffers")
        if self.max_grad_norm is None or buffers is None:
            return None
        return buffers.grad_norm.clone()

    def _found_inf(self) -> Tensor:
        """The last step's overflow flag as float32 (what torch.amp.GradScaler.update reads)."""
        buffers = self._last_step["buffers"]
        if buffers is None:
            return torch.zeros((), dtype=torch.float32, device=self._last_step["device"])
        return buffers.found_inf

    # -- subclass interface
    def _init_group(self, group: dict, *lists: list) -> bool:
        """Create missing state and append each parameter with a gradient to `lists` (in `_LISTS`
        order: None where a parameter has no such state) through _init_param; then the group's
        random seeds (optimizers with a "rng_seeds" list) and its step buffers. Returns whether any
        parameter is complex."""
        named = dict(zip(self._LISTS, lists))
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            self._init_param(group, p, named)
        if "rng_seeds" in named:
            named["rng_seeds"] += _state.rng_seeds(self, group, named["params"])
        self._init_buffers(named["params"])
        return has_complex

    def _init_param(self, group: dict, p: Tensor, lists: dict[str, list]) -> None:
        """One parameter with a gradient: create its missing state and append it to `lists`."""
        raise NotImplementedError

    def _init_buffers(self, params: list[Tensor]) -> None:
        """The step buffers of the device of the group's parameters (NOTE [step buffers])."""
        if params and params[0].device not in self._buffers:
            self._buffers[params[0].device] = _StepBuffers(params[0].device)

    def _fused_update(self, group: dict, lists: dict[str, list[Tensor]], grad_mult: Tensor | None,
                      found_inf: Tensor | None) -> None:
        """The group's one op call (complex tensors already viewed as real)."""
        raise NotImplementedError

    def _differentiable_update(self, group: dict, lists: dict[str, list[Tensor]]) -> None:
        """differentiable=True: torch's own implementation (autograd through the update)."""
        raise NotImplementedError

    def _update(self, group: dict, lists: dict[str, list[Tensor]], has_complex: bool, grad_mult: Tensor | None,
                found_inf: Tensor | None) -> None:
        if group["differentiable"]:
            if grad_mult is not None or found_inf is not None:
                raise RuntimeError("`differentiable=True` does not support loss scaling or `max_grad_norm`")
            self._differentiable_update(group, lists)
            return
        if has_complex:  # torch.optim updates complex tensors as their real views
            lists = {k: v if k == "state_steps" else as_real(v) for k, v in lists.items()}
        self._fused_update(group, lists, grad_mult, found_inf)

    def _validate_group(self, group: dict) -> None:
        """Hyper-parameter checks repeated at every step (groups can be edited after construction);
        subclasses add theirs to this one."""
        _check_differentiable(group)

    # -- the step
    def _check_inputs(self, walked: list[bool] | None = None) -> None:
        """Every check that can fail, before any parameter or state is written: every group's
        settings, and the parameters and gradients of the groups that are walked (`walked[i]`, default
        all); a group that reuses its step plan had them checked by it (NOTE [step plans])."""
        for i, group in enumerate(self.param_groups):
            self._validate_group(group)
            if walked is None or walked[i]:
                self._check_params(group)

    def _check_params(self, group: dict) -> None:
        """The checks of a group's parameters and gradients; subclasses add theirs to these."""
        name = type(self).__name__
        if group.get("fused"):  # torch.optim's check: where no fused kernel exists, say so
            for p in group["params"]:
                if p.device.type not in FUSED_DEVICES or not torch.is_floating_point(p):
                    raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                       f"supported devices: {list(FUSED_DEVICES)}.")
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

    def _grad_stats(self, grads: list[Tensor], out: Tensor, shard_group) -> Tensor:
        """grad_stats of `grads` into `out`: the provider's when it has them, else one pass, summed
        over `shard_group` when the gradients are shards (NOTE [DTensor parameters] in _dtensor.py)."""
        provided = self.grad_stats_provider(grads) if self.grad_stats_provider is not None else None
        if provided is not None:
            return out.copy_(provided)
        grad_stats(grads, out=out, backend=self.backend)
        if shard_group is not None:
            torch.distributed.all_reduce(out, group=shard_group)
            out[1].clamp_(max=1)  # the ranks' non-finite flags were summed
        return out

    def _mixed_precision_prologue(self, grads: list[Tensor], shard_group=None) -> tuple[Tensor | None, Tensor | None]:
        """(grad_mult, found_inf) for the update; see NOTE [mixed-precision step]."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        device = grads[0].device if grads else torch.device("cpu")
        need_stats = bool(grads) and (self.max_grad_norm is not None or (grad_scale is not None and found_inf is None))
        self._last_step["device"] = device
        if not grads or (grad_scale is None and found_inf is None and not need_stats):
            self._last_step["buffers"] = None
            return None, None
        buffers = self._buffers[device]
        stats = self._grad_stats(grads, buffers.stats, shard_group) if need_stats else None
        step_control(stats, on_device(grad_scale, device), on_device(found_inf, device), self.max_grad_norm or 0.0,
                     buffers.control, backend=self.backend)
        self._last_step["buffers"] = buffers
        return buffers.grad_mult, buffers.found_inf

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
            calls = []
            for group, lists, has_complex in self._group_lists():
                if lists["params"]:
                    calls.append((group, lists, has_complex))
            shard_group = _dtensor.unwrap(calls)
            grad_mult, found_inf = self._mixed_precision_prologue([g for _, lists, _ in calls for g in lists["grads"]],
                                                                  shard_group)
            for group, lists, has_complex in calls:
                self._update(group, lists, has_complex, grad_mult, found_inf)
        return loss

    def _group_lists(self) -> list[tuple[dict, dict[str, list], bool]]:
        """(group, op lists, has_complex) of every group, after every check: from the group's step
        plan where it still holds, else from a full walk, kept as the next step's plan where it
        may be (NOTE [step plans])."""
        compiling = torch.compiler.is_compiling()  # the walk is traced every time, as torch.optim's
        plans = {} if compiling else self._plans
        offsets = [0, *accumulate(len(g["params"]) for g in self.param_groups)]
        layouts = [self._plan_layout(g, offset) for g, offset in zip(self.param_groups, offsets)]
        reused = []
        for group, layout in zip(self.param_groups, layouts):
            plan = plans.get(id(group))
            reused.append(plan.reuse(self.state, group, layout) if plan is not None and plan.group is group else None)
        self._check_inputs([lists is None for lists in reused])
        out, kept = [], {}
        for group, layout, lists in zip(self.param_groups, layouts, reused):
            if lists is not None:
                kept[id(group)] = plans[id(group)]
                out.append((group, lists, kept[id(group)].has_complex))
                continue
            walked = [[] for _ in self._LISTS]
            has_complex = self._init_group(group, *walked)
            lists = dict(zip(self._LISTS, walked))
            out.append((group, lists, has_complex))
            plan = None if compiling or group["differentiable"] else StepPlan.of(self.state, group, layout, lists,
                                                                                    has_complex)
            if plan is not None:
                kept[id(group)] = plan
        if not compiling:
            self._plans = kept
        return out

    def _plan_layout(self, group: dict, offset: int) -> tuple:
        """What decides a group's state and lists besides its parameters and their state: the group
        settings `_PLAN_KEYS`, and its first parameter's place among the optimizer's (the seeds of
        stochastic rounding)."""
        return (offset, *(group.get(k) for k in self._PLAN_KEYS))

    # -- checkpoints
    def load_state_dict(self, state_dict) -> None:
        # torch.optim casts every floating state tensor to its parameter's dtype and takes the
        # checkpoint's group settings: moments, absmax and master weights are put back as saved,
        # then converted to each group's format (NOTE [state formats]).
        state_dict, finish = _state.loaded(self, state_dict, self._MOMENTS)
        super().load_state_dict(state_dict)
        finish()

    def torch_state_dict(self) -> dict:
        """This optimizer's state_dict as torch.optim's optimizer of the same name keeps it, to load
        and continue from there: fp32 moments (dequantized where compressed), without absmax, fp32
        master weights, compensation buffers or pyeff's group settings (NOTE [state formats])."""
        return _state.torch_state_dict(self, self._MOMENTS)


def checkable(value):
    """A learning rate or beta as the checks repeated at every step read it. A tensor on an
    accelerator was checked at construction (as torch.optim checks it, once); reading it at every
    step would make the host wait for the device and break CUDA graph capture, so 0.0, which every
    such check accepts, stands in for it."""
    if isinstance(value, tuple):
        return tuple(checkable(v) for v in value)
    return 0.0 if isinstance(value, Tensor) and value.device.type != "cpu" else value


def _check_differentiable(group: dict) -> None:
    if group.get("differentiable") and (group.get("master_weights") or group.get("kahan_summation")):
        raise RuntimeError("`differentiable` does not support `master_weights` or `kahan_summation`")


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
        if group.get("state_dtype") is None:  # torch's layout: fp32 moments next to master weights
            for k in moment_keys:
                if k in state and state[k].dtype != torch.float32:
                    state[k] = state[k].float()
    elif mode == "kahan" and "compensation" not in state:
        state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return mode


def append_step_and_low_precision(state: dict, p: Tensor, mode: str, state_steps: list, master_params: list,
                                  compensations: list) -> None:
    """The end of a parameter's _init_param: its step count, on its device (a torch.optim checkpoint
    may keep it on the CPU; the kernels read and increment it on the device, without a sync), and
    its master weight and compensation buffer (None where its mode has none)."""
    if state["step"].device != p.device:
        state["step"] = state["step"].to(p.device)
    state_steps.append(state["step"])
    master_params.append(state["master_param"] if mode == "master" else None)
    compensations.append(state["compensation"] if mode == "kahan" else None)


def as_real(ts: list[Tensor | None]) -> list[Tensor | None]:
    """torch.optim updates complex tensors as their real views."""
    return [torch.view_as_real(t) if isinstance(t, Tensor) and torch.is_complex(t) else t for t in ts]
