"""DTensor parameters (FSDP2's fully_shard): the kernels step each rank's local shard.

NOTE [DTensor parameters]
FSDP2 makes every parameter, gradient and (through zeros_like) optimizer state tensor a DTensor
whose local tensor is this rank's shard. The update is element-wise, so stepping the local shards
is the whole step: the op lists are unwrapped here, in one place, and the state stays DTensors (so
its state_dict is torch.optim's under FSDP2). Only the mixed-precision statistics are global: the
norm and the overflow flag are summed over the ranks that hold the shards, so that the clip factor
is clip_grad_norm_'s on the whole model and every rank skips the same steps.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without distributed support
    DTensor = None


def unwrap(calls: list[tuple[dict, dict[str, list[Tensor]], bool]]) -> dist.ProcessGroup | None:
    """Replace the DTensors in every op call's lists by their local shards, in place. Returns the
    process group over which the gradients are sharded (to sum statistics over), or None."""
    types = {t for _, lists, _ in calls for t in set(map(type, lists["grads"]))}  # a C loop over each list
    if DTensor is None or not any(issubclass(t, DTensor) for t in types):
        return None  # the common case
    specs = set()
    plain = False
    for _, lists, _ in calls:
        for g in lists["grads"]:
            if isinstance(g, DTensor):
                specs.add((g.device_mesh, tuple(g.placements)))
            else:
                plain = True
        if specs:
            for key, ts in lists.items():
                lists[key] = [t.to_local() if isinstance(t, DTensor) else t for t in ts]
    if not specs:
        return None
    if plain or len(specs) > 1:
        raise RuntimeError("pyeff.optim: DTensor parameters must all share one device mesh and placements "
                           "(as fully_shard gives them), without plain tensors beside them; got "
                           f"{sorted(str(p) for _, p in specs)}{' and plain tensors' if plain else ''}. "
                           "Use one optimizer per kind of parameter instead")
    mesh, placements = specs.pop()
    shard_dims = [d for d, p in enumerate(placements) if isinstance(p, Shard)]
    if any(not isinstance(p, (Shard, Replicate)) for p in placements) or len(shard_dims) > 1:
        raise RuntimeError(f"pyeff.optim: gradients with placements {placements} are not supported: expected one "
                           "Shard dimension (and Replicate ones), as fully_shard gives them")
    return mesh.get_group(shard_dims[0]) if shard_dims else None
