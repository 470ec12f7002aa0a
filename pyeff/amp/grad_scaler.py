"""pyeff.amp.GradScaler: torch.amp.GradScaler whose step lets pyeff's optimizers find overflows.

torch's GradScaler, before stepping an optimizer that supports amp scaling, makes its own pass over
every gradient to find infs/NaNs. With a pyeff optimizer this scaler skips that pass: it hands the
optimizer the loss scale, and the optimizer's one read-only pass yields the overflow flag and the
norm together (NOTE [mixed-precision step] in pyeff/optim/_fused.py); the flag is then recorded
for `update()` exactly as torch records its own. No host-device synchronisation.

With any other optimizer, or after an explicit `unscale_()`, everything is torch's behaviour.
"""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

from ..optim._fused import FusedOptimizer


class GradScaler(torch.amp.GradScaler):
    __doc__ = (__doc__ or "") + "\n\n" + (torch.amp.GradScaler.__doc__ or "")

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        if not self._enabled or not isinstance(optimizer, FusedOptimizer):
            return super().step(optimizer, *args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state["stage"] is OptState.UNSCALED:
            return super().step(optimizer, *args, **kwargs)  # gradients already unscaled by unscale_()

        # Take the product of the scales if the user set `optimizer.grad_scale` (torch does the same).
        scale = self._get_scale_async()
        user_scale = getattr(optimizer, "grad_scale", None)
        optimizer.grad_scale = scale if user_scale is None else scale * user_scale
        optimizer.found_inf = None  # the optimizer's own pass finds it
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:
            del optimizer.grad_scale
            del optimizer.found_inf
        found_inf = optimizer._found_inf()
        state["found_inf_per_device"] = {found_inf.device: found_inf}
        state["stage"] = OptState.STEPPED
        return retval
