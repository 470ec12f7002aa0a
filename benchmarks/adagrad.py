"""Adagrad step on the CPU: pyeff vs torch (fused=True, foreach) and DeepSpeed's CPU Adagrad, against
the ceiling.

Bytes per parameter (fp32): read p, g, sum and write p, sum = 20. The ceiling is the in-place loop
over the same 3 read / 2 written arrays, measured in the same run.

Every contender, and the ceiling, works on the same memory: the parameters, gradients and 'sum'
states of a problem are views into three flat buffers, shared by all the optimizers. On these
machines where an array lies was measured to change its streaming speed by up to 2x (arrays
allocated early in a process were slower), which would otherwise decide the ranking.

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


class Problem:
    """Parameters (with gradients) of the given sizes as views into flat buffers, plus a flat 'sum'
    buffer whose views every optimizer's state is pointed at. Each view starts 64-byte aligned, as
    a tensor of its own would (torch's allocator aligns to 64 bytes)."""

    ALIGN = 16  # fp32 elements in 64 bytes

    def __init__(self, sizes, seed=0):
        g = torch.Generator().manual_seed(seed)
        starts, offset = [], 0
        for n in sizes:
            starts.append(offset)
            offset += -(-n // self.ALIGN) * self.ALIGN
        self.flat_param, self.flat_grad = torch.randn(offset, generator=g), torch.randn(offset, generator=g)
        self.flat_sum = torch.zeros(offset)
        self.params, self.sums = [], []
        for start, n in zip(starts, sizes):
            p = torch.nn.Parameter(self.flat_param[start:start + n])
            p.grad = self.flat_grad[start:start + n]
            self.params.append(p)
            self.sums.append(self.flat_sum[start:start + n])

    def share_state(self, opt, key: str = "sum") -> None:
        for p, s in zip(self.params, self.sums):
            opt.state[p][key] = s

    def ceiling(self):
        return lambda: torch.ops.pyeff.stream_inplace_cpu([self.flat_param, self.flat_sum], [self.flat_grad])


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


def contenders(problem: Problem, deepspeed_cls):
    ps = problem.params
    opts = {
        "pyeff_cpu": pyeff.optim.Adagrad(ps, lr=LR),
        "torch_fused": torch.optim.Adagrad(ps, lr=LR, fused=True),
        "torch_foreach": torch.optim.Adagrad(ps, lr=LR, foreach=True),
    }
    for opt in opts.values():
        problem.share_state(opt)
    if deepspeed_cls is not None:
        opt = deepspeed_cls(ps, lr=LR)
        with contextlib.redirect_stdout(io.StringIO()):
            opt.step()  # DeepSpeed creates its state in the first step
        problem.share_state(opt, "exp_avg_sq")
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
        problem = Problem(sizes)
        fns = contenders(problem, deepspeed_cls)
        fns[bench.CEILING] = problem.ceiling()  # bench.ceiling_cpu's loop, on the problem's own buffers
        for fn in fns.values():  # first touch outside the timed rounds
            fn()
        progress = bench.Progress(rounds * len(fns), f"adagrad {case}")
        times = bench.interleaved(fns, rounds, progress=progress)
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
