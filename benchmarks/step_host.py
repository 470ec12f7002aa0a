"""Where a CPU optimizer step's time goes besides streaming memory (issue 13 part 4).

1. Host time: AdamW, Adagrad and SGD (momentum 0.9) on 200 fp32 tensors of 64 elements, one
   thread, so a step is all host work (Python, argument conversion, checks); steps back to back
   (warm caches), pyeff vs torch fused, median (min-max) of rounds of 200 steps; then with cold
   caches: each step after a pass over 256 MB, as a real step follows the forward and backward
   passes (the median of 20 such steps per round).
2. The 200-tensor model (bench.model_like_sizes, views of one buffer per role as in `pyeff bench
   optim`), Adagrad, default threads, interleaved rounds: the in-place ceiling loop, the op on one
   flat tensor of the same memory, the op on the 200 views, and `opt.step()`, each as % of the
   ceiling: what tensor count and the step's Python cost.

    python benchmarks/step_host.py [--quick]      (also: pyeff bench step_host)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

import pyeff  # noqa: E402
from pyeff.ops.adagrad import adagrad_step  # noqa: E402

OPTIMIZERS = {
    "AdamW": (lambda ps: pyeff.optim.AdamW(ps, lr=1e-3), lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    "Adagrad": (lambda ps: pyeff.optim.Adagrad(ps, lr=1e-2), lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True)),
    "SGD": (lambda ps: pyeff.optim.SGD(ps, lr=0.1, momentum=0.9),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True)),
}


def _seconds_per_step(fn, rounds: int, steps: int = 200) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        out.append((time.perf_counter() - t0) / steps)
    return out


def _seconds_per_cold_step(fn, rounds: int, evict: torch.Tensor, steps: int = 20) -> list[float]:
    """Like _seconds_per_step, but each step runs after a pass over `evict` (larger than the caches),
    as a real step runs after the forward and backward passes: the median of `steps` steps per round."""
    out = []
    for _ in range(rounds):
        ts = []
        for _ in range(steps):
            evict.add_(1)
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out.append(statistics.median(ts))
    return out


def host_time(rounds: int) -> list[bench.Row]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        evict = torch.zeros(64 << 20)  # 256 MB
        for name, makers in OPTIMIZERS.items():
            times, cold = {}, {}
            for provider, make in zip(("pyeff_cpu", "torch_fused"), makers):
                params = [torch.nn.Parameter(torch.randn(64)) for _ in range(200)]
                for p in params:
                    p.grad = torch.randn(64)
                opt = make(params)
                opt.step()
                times[provider] = _seconds_per_step(opt.step, rounds)
                cold[provider] = _seconds_per_cold_step(opt.step, rounds, evict)
            rows += bench.rows_from_times("step_host", f"{name} 200 tensors x 64, 1 thread", times,
                                          torch_providers=("torch_fused",))
            rows += bench.rows_from_times("step_host", f"{name} 200 tensors x 64, 1 thread, cold caches", cold,
                                          torch_providers=("torch_fused",))
    finally:
        torch.set_num_threads(threads)
    return rows


def model_gap(rounds: int, quick: bool) -> list[bench.Row]:
    sizes = bench.model_like_sizes(3_000_000 if quick else 30_000_000)
    problem = bench.SharedBuffers(sizes, dict.fromkeys(("param", "grad", "sum"), torch.float32))
    params = problem.parameters()
    opt = pyeff.optim.Adagrad(params, lr=1e-2)
    opt.step()
    problem.share_state(opt, params, {"sum": "sum"})
    flat = problem.flat
    views, grads = [p.detach() for p in params], [p.grad for p in params]
    steps, sums = [opt.state[p]["step"] for p in params], [opt.state[p]["sum"] for p in params]
    fns = {
        bench.CEILING: lambda: torch.ops.pyeff.stream_inplace_cpu([flat["param"], flat["sum"]], [flat["grad"]]),
        "op, 1 flat tensor": lambda: adagrad_step([flat["param"]], [flat["grad"]], [flat["sum"]], steps[:1], lr=1e-2),
        f"op, {len(sizes)} views": lambda: adagrad_step(views, grads, sums, steps, lr=1e-2),
        "opt.step()": opt.step,
    }
    with torch.no_grad():
        times = bench.interleaved(fns, rounds, label="step_host model")
    return bench.rows_from_times("step_host", f"Adagrad {len(sizes)} tensors {sum(sizes) / 1e6:.0f}M", times,
                                 numel=sum(sizes), bytes_per_elem=20)


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    rows = host_time(5 if quick else 9) + model_gap(5 if quick else 15, quick)
    bench.save("step_host", rows, out_dir, notes={"ceiling": "in-place loop over the model's own buffers"})
    return rows


if __name__ == "__main__":
    bench.cli(run)
