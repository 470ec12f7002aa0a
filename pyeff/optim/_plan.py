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
  the same dict, with as many entries, holding the same tensors.

These checks are C loops: pyeff._C's `grads_signature` (csrc/list_checks.cpp) reads every
parameter's gradient and the dtype, layout, device and shape of both into bytes compared with the
walk's, and its `state_lists` reads every parameter's state dict, that dict's length and the entries
the lists use into bytes compared likewise (with the op's own checks, about a tenth of the walk's
cost; without pyeff._C, or for an `optimizer.state` that is not a dict, there are no plans). A plan
keeps where each list comes from (the parameters, the gradients, one state entry of each parameter,
or a list without tensors), not the state itself: state dicts and tensors are compared by id(), so
that clearing the state between steps frees it, as with torch.optim. (An object freed and replaced
by a new one at the same address passes that comparison; the lists are built from the current state
all the same, and the op checks every tensor it is given.) Anything else edited between steps is
read by the kernels at the step (tensor values, a learning rate, the other hyper-parameters), so
nothing a user can change through torch.optim's interface is missed; a change the checks see sends
the group through the full walk, which raises the same errors as before. The walk runs every step
under torch.compile (which traces it and guards on the state, as torch.optim's `_init_group`) and
with differentiable=True. Lists holding tensors made for one step only are never kept: SGD's first
momentum buffers, and sparse gradients (coalesced by the walk), keep the step from making a plan.
"""

from __future__ import annotations

from itertools import repeat
from operator import is_

from torch import Tensor

from .. import _ext

_NO_STATE: dict = {}  # stands for a parameter without a state entry (torch.optim.SGD without momentum); never written


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(map(is_, xs, ys))


class StepPlan:
    """One group's op lists from a full walk, as where each comes from, and what the walk read
    (NOTE [step plans]). It keeps no state: state dicts and tensors are compared by identity."""

    def __init__(self, state, group: dict, layout: tuple, params: list, keys: tuple, recipes: dict,
                 grads_signature: bytes, state_signature: bytes, has_complex: bool):
        self.group = group
        self.group_params = list(group["params"])
        self.layout = layout
        self.state_id = id(state)
        self.params = params
        self.keys = keys
        self.recipes = recipes
        self.grads_signature = grads_signature
        self.state_signature = state_signature
        self.has_complex = has_complex

    @classmethod
    def of(cls, state, group: dict, layout: tuple, lists: dict, has_complex: bool) -> StepPlan | None:
        """The plan of a walk's lists, or None where a list holds tensors that are neither the
        parameters, their gradients nor one state entry of each parameter (made for this step only:
        SGD's first momentum buffers, sparse gradients coalesced by the walk), or where pyeff._C's
        list checks are missing."""
        checks = _ext.list_checks()
        params, grads = lists["params"], lists["grads"]
        if checks is None or not isinstance(state, dict) or any(g.is_sparse for g in grads):
            return None
        keys = tuple(set().union(*map(state.get, params, repeat(_NO_STATE))))
        columns, state_signature = checks.state_lists(state, params, keys)
        values = dict(zip(keys, columns))
        recipes = {}
        for name, ts in lists.items():
            if ts is params or ts is grads:
                recipes[name] = (name, None)
                continue
            key = next((k for k, v in values.items() if _same(ts, v)), None)
            if key is not None:
                recipes[name] = ("state", key)
            elif not any(isinstance(t, Tensor) for t in ts):
                recipes[name] = ("as is", list(ts))
            else:
                return None
        _, grads_signature = checks.grads_signature(group["params"])
        return cls(state, group, layout, params, keys, recipes, grads_signature, state_signature, has_complex)

    def reuse(self, state, group: dict, layout: tuple) -> dict | None:
        """This step's op lists, built from the parameters, this step's gradients and the current
        state, or None where anything the walk read has changed."""
        params = group["params"]
        checks = _ext.list_checks()
        if (checks is None or id(state) != self.state_id or layout != self.layout
                or not _same(params, self.group_params)):
            return None
        grads, signature = checks.grads_signature(params)
        if signature != self.grads_signature:  # which have gradients; dtypes, layouts, devices, shapes
            return None
        columns, signature = checks.state_lists(state, self.params, self.keys)
        if signature != self.state_signature:  # each parameter's state dict, its length, its values
            return None
        values = dict(zip(self.keys, columns))
        made = {"params": list(self.params), "grads": grads}
        return {name: made[name] if kind in made else values[arg] if kind == "state" else list(arg)
                for name, (kind, arg) in self.recipes.items()}
