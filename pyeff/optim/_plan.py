"""Step plans: a group's op lists kept from one step to the next.

NOTE [step plans]
Before its one op call per group, a step walks every parameter in Python: it checks the gradient,
looks up (or creates) the state and appends a dozen tensors to the op's lists. That walk costs
about 2.5 us per parameter: 0.5 ms for a 200-tensor model, 4-6 % of a CPU step that otherwise runs
at the memory's speed, and on a GPU more than the kernels of a small model take. After a full
walk, a group keeps its lists in a plan; the next step reuses them, with this step's gradients,
when everything the walk read is as it was:

- the group's parameter list holds the same tensors (identity), and the group settings that decide
  which state a parameter has (`_PLAN_KEYS`) are equal;
- the same parameters have gradients, of the dtypes, devices and shapes the walk checked, none
  sparse, and the parameters have their dtypes still;
- `optimizer.state` is the same mapping (load_state_dict replaces it), each parameter's state is
  the same dict, with as many entries, holding the same tensors (identity).

These checks are C loops over lists (`map` over attribute and item getters, about a tenth of the
walk). Anything else edited between steps is read by the kernels at the step (tensor values, a
learning rate, the other hyper-parameters), so nothing a user can change through torch.optim's
interface is missed; a change the checks see sends the group through the full walk, which raises
the same errors as before. The walk runs every step under torch.compile (which traces it and
guards on the state, as torch.optim's `_init_group`) and with differentiable=True; a step whose
lists hold tensors made for that step only (SGD's first momentum buffers, coalesced sparse
gradients) keeps no plan.
"""

from __future__ import annotations

from itertools import compress, repeat
from operator import attrgetter, is_, is_not

_GRAD, _DTYPE, _DEVICE, _SHAPE, _IS_SPARSE = (attrgetter(a) for a in ("grad", "dtype", "device", "shape", "is_sparse"))
_NO_STATE: dict = {}  # stands for a parameter without a state entry (torch.optim.SGD without momentum); never written


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(map(is_, xs, ys))


class StepPlan:
    """One group's op lists from a full walk, and what the walk read (NOTE [step plans])."""

    def __init__(self, state, group: dict, layout: tuple, lists: dict, has_complex: bool):
        params = lists["params"]
        self.group = group
        self.group_params = list(group["params"])
        self.layout = layout
        self.state = state
        self.with_grad = [p.grad is not None for p in self.group_params]
        self.all_grads = all(self.with_grad)
        self.states = list(map(state.get, params, repeat(_NO_STATE)))
        self.lengths = list(map(len, self.states))
        self.values = {k: list(map(dict.get, self.states, repeat(k))) for k in set().union(*self.states)}
        self.param_dtypes = list(map(_DTYPE, params))
        self.grad_dtypes = list(map(_DTYPE, lists["grads"]))
        self.devices = list(map(_DEVICE, params))
        self.shapes = list(map(_SHAPE, params))
        self.lists = {k: None if k == "grads" else v for k, v in lists.items()}
        self.has_complex = has_complex

    @staticmethod
    def keepable(lists: dict) -> bool:
        """Whether a walk's lists may be kept: not with sparse gradients (coalesced for the step)."""
        return not any(map(_IS_SPARSE, lists["grads"]))

    def reuse(self, state, group: dict, layout: tuple) -> dict | None:
        """This step's op lists (the kept ones with this step's gradients), or None where anything
        the walk read has changed."""
        params = group["params"]
        if state is not self.state or layout != self.layout or not _same(params, self.group_params):
            return None
        grads = list(map(_GRAD, params))
        with_grad = list(map(is_not, grads, repeat(None)))
        if with_grad != self.with_grad:
            return None
        if not self.all_grads:
            grads = list(compress(grads, with_grad))
        stepped = self.lists["params"]
        states = list(map(state.get, stepped, repeat(_NO_STATE)))
        if not _same(states, self.states) or list(map(len, states)) != self.lengths:
            return None
        for key, values in self.values.items():
            if not all(map(is_, map(dict.get, states, repeat(key)), values)):
                return None
        if (list(map(_DTYPE, grads)) != self.grad_dtypes or list(map(_SHAPE, grads)) != self.shapes
                or list(map(_DEVICE, grads)) != self.devices or any(map(_IS_SPARSE, grads))
                or list(map(_DTYPE, stepped)) != self.param_dtypes):
            return None
        lists = dict(self.lists)
        lists["grads"] = grads
        return lists
