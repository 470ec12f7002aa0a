"""Adagrad step on the CPU: pyeff vs torch (fused=True, foreach) and DeepSpeed's CPU Adagrad, against
the ceiling.

Bytes per parameter (fp32): read p, g, sum and write p, sum = 20. The ceiling is the in-place loop
over the same 3 read / 2 written arrays, measured in the same run.

Every contender, and the ceiling, works on the same memory: the parameters, gradients and 'sum'
states of a problem are views into three flat buffers shared by all the optimizers
(bench.SharedBuffers: where an array lies changes its streaming speed on these machines).

DeepSpeed (`deepspeed.ops.adagrad.DeepSpeedCPUAdagrad`) is an optional contender, never a
dependency: it is timed when `deepspeed` imports and its C++ op builds (a JIT compile of about two
minutes the first time; `--quick` uses it only when that build is already cached), and otherwise
skipped with a note in the results.

    python benchmarks/adagrad.py [--quick]     (also: pyeff bench adagrad)
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

import pyeff  # noqa: E402

BYTES_PER_PARAM = 20
LR = 1e-2
TORCH_PROVIDERS = ("torch_fused", "torch_foreach")


def deepspeed_adagrad(quick: bool):
    """(the optimizer class, None) or (None, why it is skipped)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
    except Exception as e:  # deepspeed raises more than ImportError when its environment is incomplete
        return None, f"deepspeed not importable ({type(e).__name__}: {e})"
    if quick:
        try:
            from torch.utils.cpp_extension import _get_build_directory

            built = (Path(_get_build_directory("cpu_adagrad", verbose=False)) / "cpu_adagrad.so").exists()
        except Exception:  # a private torch helper: if it moved, assume nothing is built
            built = False
        if not built:
            return None, "DeepSpeed's cpu_adagrad op is not built yet; --quick does not wait for its JIT compile"
    try:
        probe = torch.nn.Parameter(torch.randn(8))
        probe.grad = torch.randn(8)
        with contextlib.redirect_stdout(io.StringIO()):
            DeepSpeedCPUAdagrad([probe], lr=LR).step()
    except Exception as e:
        return None, f"DeepSpeed's cpu_adagrad op failed to build or run ({type(e).__name__}: {e})"
    return DeepSpeedCPUAdagrad, None


def contenders(problem: bench.SharedBuffers, deepspeed_cls):
    ps = problem.parameters()
    opts = {
        "pyeff_cpu": pyeff.optim.Adagrad(ps, lr=LR),
        "torch_fused": torch.optim.Adagrad(ps, lr=LR, fused=True),
        "torch_foreach": torch.optim.Adagrad(ps, lr=LR, foreach=True),
    }
    for opt in opts.values():
        problem.share_state(opt, ps, {"sum": "sum"})
    if deepspeed_cls is not None:
        opt = deepspeed_cls(ps, lr=LR)
        with contextlib.redirect_stdout(io.StringIO()):
            opt.step()  # DeepSpeed creates its state in the first step
        problem.share_state(opt, ps, {"exp_avg_sq": "sum"})
        opts["deepspeed_cpu"] = opt
    return {name: opt.step for name, opt in opts.items()}


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    flat = [64_000_000] if not quick else [4_000_000]
    model = bench.model_like_sizes() if not quick else bench.model_like_sizes(3_000_000)
    problems = {f"flat {sum(flat) / 1e6:.0f}M": flat, f"{len(model)} tensors {sum(model) / 1e6:.0f}M": model}
    rounds = 5 if quick else 15
    deepspeed_cls, skipped = deepspeed_adagrad(quick)
    if skipped:
        print(f"adagrad: deepspeed_cpu skipped: {skipped}", file=sys.stderr)
    rows = []
    for case, sizes in problems.items():
        numel = sum(sizes)
        problem = bench.SharedBuffers(sizes, dict.fromkeys(("param", "grad", "sum"), torch.float32))
        fns = contenders(problem, deepspeed_cls)
        flat = problem.flat  # the ceiling loop on the same memory: p and sum read and written, g read
        fns[bench.CEILING] = lambda: torch.ops.pyeff.stream_inplace_cpu([flat["param"], flat["sum"]], [flat["grad"]])
        for fn in fns.values():  # first touch outside the timed rounds
            fn()
        times = bench.interleaved(fns, rounds, label=f"adagrad {case}")
        rows += bench.rows_from_times("adagrad", case, times, numel=numel, bytes_per_elem=BYTES_PER_PARAM,
                                      torch_providers=TORCH_PROVIDERS)
        del fns, problem
    notes = {"ceiling": "in-place loop reading 3 and writing 2 fp32 arrays (the problem's own buffers)",
             "memory": "all contenders update the same parameter, gradient and sum buffers"}
    if skipped:
        notes["deepspeed_cpu"] = f"skipped: {skipped}"
    bench.save("adagrad", rows, out_dir, notes=notes)
    return rows


if __name__ == "__main__":
    bench.cli(run)
