"""pyeff.distributed: DDP helpers.

- `register_grad_stats_hook(ddp_model, optimizer)`: a comm hook that averages each gradient bucket
  and, in the same pass, computes its squared norm and non-finite flag, which the pyeff optimizer's
  mixed-precision step then uses instead of its own read pass (NOTE [grad stats during the
  all-reduce] in comm_hook.py). Works with gloo and NCCL, optionally with fp16/bf16 compression.
"""

from .comm_hook import GradStatsState, grad_stats_hook, register_grad_stats_hook

__all__ = ["GradStatsState", "grad_stats_hook", "register_grad_stats_hook"]
