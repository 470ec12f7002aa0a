"""SGD with momentum on the CPU (the ResNet recipe: momentum 0.9, weight decay 1e-4): pyeff vs torch
(fused=True, foreach), against the ceiling.

Bytes per parameter (fp32): read p, g, momentum_buffer and write p, momentum_buffer = 20. The
ceiling is the in-place loop over the same 3 read / 2 written arrays, measured in the same run.
Every contender, and the ceiling, works on the same memory (bench.SharedBuffers).

    python benchmarks/sgd.py [--quick]     (also: pyeff bench sgd)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

import pyeff  # noqa: E402

BYTES_PER_PARAM = 20
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
TORCH_PROVIDERS = ("torch_fused", "torch_foreach")


def contenders(problem: bench.SharedBuffers):
    ps = problem.parameters()
    opts = {
        "pyeff_cpu": pyeff.optim.SGD(ps, **HYPER),
        "torch_fused": torch.optim.SGD(ps, **HYPER, fused=True),
        "torch_foreach": torch.optim.SGD(ps, **HYPER, foreach=True),
    }
    for opt in opts.values():
        opt.step()  # the first step creates the momentum buffers (buf = grad), then shared
        problem.share_state(opt, ps, {"momentum_buffer": "momentum_buffer"})
    return {name: opt.step for name, opt in opts.items()}


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    flat = [64_000_000] if not quick else [4_000_000]
    model = bench.model_like_sizes() if not quick else bench.model_like_sizes(3_000_000)
    problems = {f"flat {sum(flat) / 1e6:.0f}M": flat, f"{len(model)} tensors {sum(model) / 1e6:.0f}M": model}
    rounds = 5 if quick else 15
    rows = []
    for case, sizes in problems.items():
        numel = sum(sizes)
        problem = bench.SharedBuffers(sizes, dict.fromkeys(("param", "grad", "momentum_buffer"), torch.float32))
        fns = contenders(problem)
        flat = problem.flat  # the ceiling loop on the same memory: p and the buffer read and written, g read
        fns[bench.CEILING] = lambda: torch.ops.pyeff.stream_inplace_cpu([flat["param"], flat["momentum_buffer"]],
                                                                        [flat["grad"]])
        for fn in fns.values():  # first touch outside the timed rounds
            fn()
        times = bench.interleaved(fns, rounds, label=f"sgd {case}")
        rows += bench.rows_from_times("sgd", case, times, numel=numel, bytes_per_elem=BYTES_PER_PARAM,
                                      torch_providers=TORCH_PROVIDERS)
        del fns, problem
    notes = {"ceiling": "in-place loop reading 3 and writing 2 fp32 arrays (the problem's own buffers)",
             "memory": "all contenders update the same parameter, gradient and momentum buffers",
             "hyper": ", ".join(f"{k}={v}" for k, v in HYPER.items())}
    bench.save("sgd", rows, out_dir, notes=notes)
    return rows


if __name__ == "__main__":
    bench.cli(run)
