"""AdamW step on the CPU: pyeff vs torch (fused=True, foreach, torch.compile), against the ceiling.

Bytes per parameter (fp32): read p, g, m, v and write p, m, v = 28. The ceiling is the in-place
loop over the same 4 read / 3 written arrays, measured in the same run.

    python benchmarks/optim.py [--quick]     (also: pyeff bench optim)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

import pyeff  # noqa: E402

BYTES_PER_PARAM = 28
TORCH_PROVIDERS = ("torch_fused", "torch_foreach", "torch_compile")


def _make(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def contenders(sizes, with_compile: bool):
    out = {}
    for name, make_opt in [
        ("pyeff_cpu", lambda ps: pyeff.optim.AdamW(ps, lr=1e-3)),
        ("torch_fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        ("torch_foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    ]:
        out[name] = make_opt(_make(sizes)).step
    if with_compile:
        # A tensor lr keeps the compiled graph from recompiling as the step count changes.
        opt = torch.optim.AdamW(_make(sizes), lr=torch.tensor(1e-3), foreach=True)
        out["torch_compile"] = torch.compile(opt.step)
    return out


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    flat = [64_000_000] if not quick else [4_000_000]
    model = bench.model_like_sizes() if not quick else bench.model_like_sizes(3_000_000)
    problems = {f"flat {sum(flat) / 1e6:.0f}M": flat, f"{len(model)} tensors {sum(model) / 1e6:.0f}M": model}
    rounds = 5 if quick else 15
    rows = []
    for case, sizes in problems.items():
        numel = sum(sizes)
        fns = contenders(sizes, with_compile=not quick)
        fns[bench.CEILING] = bench.ceiling_cpu(numel, read_write=3, read_only=1)
        for fn in fns.values():  # compile / first touch outside the timed rounds
            fn()
        progress = bench.Progress(rounds * len(fns), f"optim {case}")
        times = bench.interleaved(fns, rounds, progress=progress)
        rows += bench.rows_from_times("adamw", case, times, numel=numel, bytes_per_elem=BYTES_PER_PARAM,
                                      torch_providers=TORCH_PROVIDERS)
        del fns
    bench.save("optim", rows, out_dir, notes={"ceiling": "in-place loop reading 4 and writing 3 fp32 arrays"})
    return rows


if __name__ == "__main__":
    bench.cli(run)
