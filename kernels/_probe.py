"""A tiny kernel that tells whether Triton's interpreter can run pyeff's kernels here: some
triton/NumPy pairs (triton 3.6 with NumPy >= 2.4) fail on any loop with a run-time bound."""

import torch
import triton
import triton.language as tl


@triton.jit
def _runtime_bound_loop(X, N, BLOCK: tl.constexpr):
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(X + offs, offs.to(tl.float32), mask=offs < N)


def interpreter_problem() -> str | None:
    """None if the interpreter runs the probe correctly on a CPU tensor, else what went wrong."""
    x = torch.full((20,), -1.0)
    try:
        _runtime_bound_loop[(1,)](x, 20, BLOCK=8)
    except Exception as e:  # the interpreter raises its own error types, varying by version
        return f"Triton {triton.__version__}'s interpreter fails here ({type(e).__name__}: {e})"
    if not torch.equal(x, torch.arange(20.0)):
        return f"Triton {triton.__version__}'s interpreter computes wrong results here"
    return None
