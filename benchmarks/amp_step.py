"""The whole mixed-precision optimizer step on the CPU: bf16 parameters with fp32 master weights,
loss scaling, gradient clipping (about 30M parameters in about 200 tensors).

- pyeff: `pyeff.amp.GradScaler.step(AdamW(master_weights=True, max_grad_norm=1.0))` + `update()`:
  one read-only pass over the bf16 gradients (overflow flag and norm), then one fused update
  reading grad, master, m, v and writing master, m, v and the bf16 parameter:
  2 + (2 + 4 + 4 + 4) + (4 + 4 + 4 + 2) = 30 bytes per parameter.
- torch's best composition: copy bf16 grads into fp32 master grads (2 + 4), GradScaler.unscale_
  (4 + 4), clip_grad_norm_ (norm 4, scale 4 + 4), fused AdamW on the masters (16 + 12), copy the
  masters back into the bf16 parameters (4 + 2) = 60 bytes per parameter.

    python benchmarks/amp_step.py [--quick]     (also: pyeff bench amp_step)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

import pyeff  # noqa: E402

BYTES = {"pyeff_cpu": 30, "torch_composition": 60}
SCALE = 2.0**12


def _bf16_params(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=g).bfloat16()) for n in sizes]
    for p in params:  # scaled gradients, as backward of a scaled loss leaves them
        p.grad = (torch.randn(p.shape, generator=g) * (SCALE * 1e-3)).bfloat16()
    return params


def pyeff_step(params, backend=None):
    """pyeff's whole step over bf16 `params` (with scaled gradients): master weights, clipping and
    the loss scale fused in."""
    device = params[0].device
    opt = pyeff.optim.AdamW(params, lr=1e-3, master_weights=True, max_grad_norm=1.0, backend=backend)
    scaler = pyeff.amp.GradScaler(device.type, init_scale=SCALE, growth_interval=10**9)
    scaler.scale(torch.ones((), device=device))  # what scaling the loss does first: creates the scale tensor

    def step():
        scaler.step(opt)
        scaler.update()

    return step


def torch_step(params):
    """torch's best composition of the same step over bf16 `params` (see the module docstring)."""
    device = params[0].device
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    for m in masters:
        m.grad = torch.empty_like(m)
    opt = torch.optim.AdamW(masters, lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=SCALE, growth_interval=10**9)
    scaler.scale(torch.ones((), device=device))
    grads = [p.grad for p in params]
    master_grads = [m.grad for m in masters]

    def step():
        torch._foreach_copy_(master_grads, grads)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            torch._foreach_copy_(params, masters)

    return step


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    sizes = bench.model_like_sizes() if not quick else bench.model_like_sizes(3_000_000)
    numel = sum(sizes)
    rounds = 5 if quick else 15
    fns = {"pyeff_cpu": pyeff_step(_bf16_params(sizes)), "torch_composition": torch_step(_bf16_params(sizes))}
    for fn in fns.values():
        fn()
    case = f"{len(sizes)} tensors {numel / 1e6:.0f}M bf16+master"
    times = bench.interleaved(fns, rounds, label=f"amp_step {case}")
    rows = bench.rows_from_times("amp_step", case, times, numel=numel, bytes_per_elem=BYTES,
                                 torch_providers=("torch_composition",))
    bench.save("amp_step", rows, out_dir, notes={"bytes_per_param": BYTES})
    return rows


if __name__ == "__main__":
    bench.cli(run)
