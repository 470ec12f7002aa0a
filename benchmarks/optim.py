"""AdamW step on the CPU: pyeff vs torch (fused=True, foreach, torch.compile), against the ceiling.

Bytes per parameter (fp32): read p, g, m, v and write p, m, v = 28. The ceiling is the in-place
loop over the same 4 read / 3 written arrays, measured in the same run. Every contender and the
ceiling work on the same memory (bench.SharedBuffers: where an array lies changes its speed here).

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


def contenders(problem: bench.SharedBuffers, with_compile: bool):
    """Each optimizer's step over the problem's shared parameters, gradients and moments."""
    ps = problem.parameters()
    opts = {
        "pyeff_cpu": pyeff.optim.AdamW(ps, lr=1e-3),
        "torch_fused": torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch_foreach": torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    }
    if with_compile:
        # A tensor lr keeps the compiled graph from recompiling as the step count changes.
        opts["torch_compile"] = torch.optim.AdamW(ps, lr=torch.tensor(1e-3))
    fns = {}
    for name, opt in opts.items():
        opt.step()  # creates the state, then pointed at the shared moments
        problem.share_state(opt, ps, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"})
        fns[name] = torch.compile(opt.step) if name == "torch_compile" else opt.step
    return fns


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    flat = [64_000_000] if not quick else [4_000_000]
    model = bench.model_like_sizes() if not quick else bench.model_like_sizes(3_000_000)
    problems = {f"flat {sum(flat) / 1e6:.0f}M": flat, f"{len(model)} tensors {sum(model) / 1e6:.0f}M": model}
    rounds = 5 if quick else 15
    rows = []
    for case, sizes in problems.items():
        numel = sum(sizes)
        problem = bench.SharedBuffers(sizes, dict.fromkeys(("param", "grad", "exp_avg", "exp_avg_sq"), torch.float32))
        fns = contenders(problem, with_compile=not quick)
        flat = problem.flat  # the ceiling loop on the same memory: p, m, v read and written, g read
        fns[bench.CEILING] = lambda: torch.ops.pyeff.stream_inplace_cpu(
            [flat["param"], flat["exp_avg"], flat["exp_avg_sq"]], [flat["grad"]])
        for fn in fns.values():  # compile / first touch outside the timed rounds
            fn()
        times = bench.interleaved(fns, rounds, label=f"optim {case}")
        rows += bench.rows_from_times("adamw", case, times, numel=numel, bytes_per_elem=BYTES_PER_PARAM,
                                      torch_providers=TORCH_PROVIDERS)
        del fns, problem
    bench.save("optim", rows, out_dir, notes={"ceiling": "in-place loop reading 4 and writing 3 fp32 arrays"})
    return rows


if __name__ == "__main__":
    bench.cli(run)
