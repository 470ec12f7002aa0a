"""The op layer: each op's contract, its plain-PyTorch reference and the dispatch to a backend.

Backends: `reference` (plain torch, always there), `cpu` (C++ in pyeff._C), `cuda`, `triton`.
PYEFF_BACKEND or an op's `backend=` argument forces one; by default the fastest usable one for
the tensors' device runs. Every op is a torch.library custom op in the `pyeff` namespace with a
fake implementation, so it traces under torch.compile.
"""

from ._registry import BACKENDS, backend_usable
from .adagrad import ADAGRAD, adagrad_step
from .adam import ADAM, adam_step
from .grad_stats import GRAD_STATS, grad_stats

OPS = {op.name: op for op in (ADAGRAD, ADAM, GRAD_STATS)}

__all__ = ["BACKENDS", "OPS", "adagrad_step", "adam_step", "backend_usable", "grad_stats"]
