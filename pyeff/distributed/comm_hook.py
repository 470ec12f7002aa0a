"""A DDP communication hook that hands the optimizer the statistics of the gradients it averages.

NOTE [grad stats during the all-reduce]
The mixed-precision step needs the global squared norm and the non-finite flag of all gradients
(NOTE [mixed-precision step] in pyeff/optim/_fused.py), which costs one read pass over them. Under
DDP every gradient bucket is already touched after its all-reduce, so the hook computes the
bucket's statistics in that same pass, while later buckets are still being reduced:

    all_reduce(bucket, SUM)  ->  bucket *= 1 / world, stats += [sum(bucket**2), any non-finite]

the second part in one pass (pyeff.ops.scale_grad_stats). With compression, the bucket is cast to
fp16/bf16 and divided by the world size in one pass (a sum in fp16 could overflow before the
division), all-reduced, then widened back into the bucket by the pass that yields the statistics.

At the end of the backward the summed statistics, and the gradient tensors and versions they
describe, are handed to the linked optimizer, which uses them instead of its own pass only if the
gradients it steps are exactly those (same tensors, unmodified since: `_version`); otherwise it
makes its own pass as before. Each handed set is used once. Bucket partials are combined in
float64 in bucket order, and only when every bucket reported.

With ZeroRedundancyOptimizer each rank's optimizer steps a shard of the parameters, while the
hook saw all of them: the norm is then the whole model's (as `clip_grad_norm_(model.parameters())`
before a ZeRO step), and the overflow flag is the same on every rank.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.scale_grad_stats import scale_grad_stats

_COMPRESS = (None, torch.float16, torch.bfloat16)


class GradStatsState:
    """State of `grad_stats_hook`: the process group, the compression dtype, and the statistics of
    the current backward until the optimizer takes them."""

    def __init__(self, process_group: dist.ProcessGroup | None = None, compress: torch.dtype | None = None,
                 backend: str | None = None):
        if compress not in _COMPRESS:
            raise ValueError(f"Invalid compress: {compress}; expected None, torch.float16 or torch.bfloat16")
        self.process_group = process_group
        self.compress = compress
        self.backend = backend
        self._partials: dict[int, Tensor] = {}  # bucket index -> float32 [sum of squares, non-finite]
        self._params: dict[int, list[torch.nn.Parameter]] = {}  # bucket index -> its parameters
        self._buckets = 0  # how many buckets this backward has
        self._ready: tuple[Tensor, dict[int, tuple[int, int]]] | None = None
        self.optimizers: list = []

    # -- filled by the hook during the backward
    def _begin(self, bucket) -> None:
        """Called by the hook, in the backward. DDP reduces the buckets in index order, so bucket 0
        starts each backward's statistics (whatever an interrupted backward left is dropped). DDP
        queues its own end-of-backward callback (which waits for the buckets and copies them into
        the .grad tensors) when the last bucket is ready, after the hooks ran; a callback queued
        from within a callback runs after every one queued before it, so `_finish` runs after DDP's."""
        if bucket.is_last():
            self._buckets = bucket.index() + 1
        if bucket.index() == 0:
            self._partials, self._params, self._ready = {}, {}, None
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: engine.queue_callback(self._finish))

    def _add(self, bucket, stats: Tensor) -> None:  # may run on the communication thread
        self._partials[bucket.index()] = stats
        self._params[bucket.index()] = bucket.parameters()

    def _finish(self) -> None:
        partials = [self._partials[i] for i in sorted(self._partials)]
        params = [p for i in sorted(self._params) for p in self._params[i]]
        complete = len(partials) == self._buckets
        self._partials, self._params = {}, {}
        if not complete:  # a bucket's reduction did not report: the optimizer makes its own pass
            return
        total = torch.stack(partials).double().sum(0)
        stats = torch.stack([total[0], total[1].clamp(max=1)]).float()
        # Identify the gradients described: the tensor and its version counter after DDP wrote it.
        versions = {id(p.grad): (p.grad._version, p.grad.data_ptr()) for p in params if p.grad is not None}
        self._ready = (stats, versions)

    # -- read by the optimizer's prologue (FusedOptimizer.grad_stats_provider)
    def take(self, grads: list[Tensor], *, subset: bool = False) -> Tensor | None:
        """This backward's statistics if `grads` are exactly the gradients it reduced (or, with
        `subset`, among them) and unmodified since; else None. Consumes them either way."""
        ready, self._ready = self._ready, None
        if ready is None:
            return None
        stats, versions = ready
        if not subset and len(grads) != len(versions):
            return None
        for g in grads:
            seen = versions.get(id(g))
            if seen is None or seen != (g._version, g.data_ptr()):
                return None
        return stats


def grad_stats_hook(state: GradStatsState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook: average the bucket over the ranks and record its statistics (see the NOTE)."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    state._begin(bucket)
    if state.compress is None:
        wire = buffer
    else:
        wire = torch.empty_like(buffer, dtype=state.compress)
        torch.div(buffer, world, out=wire)
    fut = dist.all_reduce(wire, group=group, async_op=True).get_future()

    def finish(fut: torch.futures.Future) -> Tensor:
        reduced = fut.value()[0]
        scale = 1.0 / world if state.compress is None else 1.0
        state._add(bucket, scale_grad_stats(reduced, buffer, scale, backend=state.backend))
        return buffer

    return fut.then(finish)


def register_grad_stats_hook(model: torch.nn.parallel.DistributedDataParallel, optimizer,
                             process_group: dist.ProcessGroup | None = None,
                             compress: torch.dtype | None = None, backend: str | None = None) -> GradStatsState:
    """Register `grad_stats_hook` on a DDP model and link it to `optimizer` (a pyeff optimizer, or a
    ZeroRedundancyOptimizer whose optimizer_class is one): its mixed-precision step then takes the
    norm and the overflow flag from the all-reduce instead of its own pass. `compress` (torch.float16
    or torch.bfloat16) sends the gradients in that dtype. Returns the hook's state."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from ..optim._fused import FusedOptimizer

    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError("register_grad_stats_hook: expected a DistributedDataParallel model, "
                        f"got {type(model).__name__}")
    subset = isinstance(optimizer, ZeroRedundancyOptimizer)
    local = optimizer.optim if subset else optimizer
    if not isinstance(local, FusedOptimizer):
        raise TypeError(f"register_grad_stats_hook: expected a pyeff optimizer (or a ZeroRedundancyOptimizer of one), "
                        f"got {type(local).__name__}; use torch's own comm hooks with other optimizers")
    state = GradStatsState(process_group if process_group is not None else model.process_group, compress, backend)
    model.register_comm_hook(state, grad_stats_hook)
    local.grad_stats_provider = lambda grads: state.take(grads, subset=subset)
    state.optimizers.append(local)
    return state
