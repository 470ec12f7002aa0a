"""Optimizer steps on an NVIDIA GPU: pyeff's `cuda` and `triton` backends vs torch `fused=True` and
`foreach`, against the device's copy bandwidth measured in the same run over the same bytes.
Skipped without a GPU.

Cases (parameters shaped like a transformer's, ~300 tensors; bench.model_like_sizes):
- adamw: fp32 AdamW over 256M parameters. Every provider reads p, g, m, v and writes p, m, v:
  28 bytes per parameter.
- amp: the whole mixed-precision step over bf16 parameters with fp32 masters, a GradScaler and
  clipping at 1.0. pyeff: `pyeff.amp.GradScaler.step(AdamW(master_weights=True, max_grad_norm=1.0))`
  + update(): a read-only pass over the bf16 gradients, then one update reading grad, master, m, v
  and writing master, m, v and the bf16 parameter = 30 bytes per parameter. torch's composition:
  copy the bf16 gradients into fp32 master gradients, GradScaler.unscale_, clip_grad_norm_, fused
  AdamW on the masters, copy back to bf16 = 60 bytes per parameter (benchmarks/amp_step.py).
- adagrad: fp32 Adagrad; reads p, g, sum and writes p, sum: 20 bytes per parameter. torch has no
  fused CUDA Adagrad: its best is foreach.
- sgd: fp32 SGD with momentum 0.9 and weight decay 1e-4; reads p, g, momentum_buffer and writes p,
  momentum_buffer: 20 bytes per parameter.

The ceiling of a case is a device-to-device copy of as many bytes as pyeff's step moves (half read,
half written). Every contender works on the same parameters, gradients and state (one set of
buffers per case; each parameter and gradient its own allocation, as a model's are). A round
times REPS steps back to back between two CUDA events, as a training loop runs them (the host
queues the next step while the GPU works), contenders interleaved; the table gives medians and
min-max over the rounds. The notes give, per contender, the host's time per step (`host_ms`: the
Python and launch work; a step is host-bound where it exceeds the GPU's time) and the time of
the step's GPU kernels alone, from the profiler (`kernel_ms`, `kernel_pct_ceiling`). `--quick`
runs fewer rounds on the same sizes (the targets are stated for them) and sweeps the Triton
kernel's block size and warps on the adamw case.

    python benchmarks/optim_gpu.py [--quick]     (also: pyeff bench optim_gpu)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402
import amp_step  # noqa: E402

import pyeff  # noqa: E402

TOTAL = 256_000_000
COUNT = 300
TORCH_PROVIDERS = ("torch_fused", "torch_foreach", "torch_composition")


REPS = 5


def timed_rounds(fns: dict, rounds: int, device: torch.device, warmup: int = 2,
                 host: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of each contender, interleaved rounds; on a GPU, REPS calls back to back
    between CUDA events, and the host's seconds per call added to `host`."""
    if device.type != "cuda":
        return bench.interleaved(fns, rounds, device, warmup=warmup)
    times = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(warmup + rounds):
        k = r % len(order)
        for name, fn in order[k:] + order[:k]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            t0 = time.perf_counter()
            for _ in range(REPS):
                fn()
            t1 = time.perf_counter()
            end.record()
            end.synchronize()
            if r >= warmup:
                times[name].append(start.elapsed_time(end) / 1e3 / REPS)
                if host is not None:
                    host.setdefault(name, []).append((t1 - t0) / REPS)
    return times


def kernel_seconds(fn, calls: int = 3) -> float:
    """Seconds per call of the GPU kernels `fn` launches (the profiler's device time), host excluded."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in events) / 1e6 / calls


def copy_ceiling(numel: int, bytes_per_param: int, device: torch.device):
    """A copy moving numel * bytes_per_param bytes (half read, half written)."""
    n = numel * bytes_per_param // 8  # fp32 elements per buffer
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return lambda: dst.copy_(src)


def _params(sizes, device, dtype, seed=0, grad_scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    flat = torch.randn(sum(sizes), device=device, generator=g)
    grads = torch.randn(sum(sizes), device=device, generator=g) * grad_scale
    params, start = [], 0
    for n in sizes:  # each its own allocation, as a model's parameters and gradients are
        p = torch.nn.Parameter(flat[start:start + n].to(dtype, copy=True))
        p.grad = grads[start:start + n].to(dtype, copy=True)
        params.append(p)
        start += n
    return params


def _share_state(opts: dict, keys: tuple[str, ...]) -> None:
    """After a first step: every optimizer's state tensors are the first one's (the same memory)."""
    first = next(iter(opts.values()))
    for opt in opts.values():
        for p_first, p in zip(first.param_groups[0]["params"], opt.param_groups[0]["params"]):
            for key in keys:
                opt.state[p][key] = first.state[p_first][key]


def adamw_contenders(sizes, device, backends, **kwargs):
    params = _params(sizes, device, torch.float32)
    opts = {f"pyeff_{b}": pyeff.optim.AdamW(params, lr=1e-3, backend=b, **kwargs) for b in backends}
    if device.type == "cuda":
        opts["torch_fused"] = torch.optim.AdamW(params, lr=1e-3, fused=True)
        opts["torch_foreach"] = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    for opt in opts.values():
        opt.step()
    _share_state(opts, ("exp_avg", "exp_avg_sq"))
    return {name: opt.step for name, opt in opts.items()}


def adagrad_contenders(sizes, device, backends):
    params = _params(sizes, device, torch.float32)
    opts = {f"pyeff_{b}": pyeff.optim.Adagrad(params, lr=1e-2, backend=b) for b in backends}
    opts["torch_foreach"] = torch.optim.Adagrad(params, lr=1e-2, foreach=True)
    for opt in opts.values():
        opt.step()
    _share_state(opts, ("sum",))
    return {name: opt.step for name, opt in opts.items()}


def sgd_contenders(sizes, device, backends):
    params = _params(sizes, device, torch.float32)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    opts = {f"pyeff_{b}": pyeff.optim.SGD(params, **hyper, backend=b) for b in backends}
    if device.type == "cuda":
        opts["torch_fused"] = torch.optim.SGD(params, **hyper, fused=True)
    opts["torch_foreach"] = torch.optim.SGD(params, **hyper, foreach=True)
    for opt in opts.values():
        opt.step()
    _share_state(opts, ("momentum_buffer",))
    return {name: opt.step for name, opt in opts.items()}


def amp_contenders(sizes, device, backends):
    """pyeff's fused mixed-precision step vs torch's composition (benchmarks/amp_step.py), on the
    same bf16 parameters."""
    params = _params(sizes, device, torch.bfloat16, grad_scale=amp_step.SCALE * 1e-3)
    fns = {f"pyeff_{b}": amp_step.pyeff_step(params, backend=b) for b in backends}
    fns["torch_composition"] = amp_step.torch_step(params)
    for fn in fns.values():
        fn()
    return fns


BYTES = {"adamw": 28, "amp": {"pyeff": 30, "torch_composition": 60}, "adagrad": 20, "sgd": 20}


def run_cases(sizes, device, backends, rounds) -> list[bench.Row]:
    numel = sum(sizes)
    rows = []
    makers = {"adamw": lambda: adamw_contenders(sizes, device, backends),
              "amp": lambda: amp_contenders(sizes, device, backends),
              "adagrad": lambda: adagrad_contenders(sizes, device, backends),
              "sgd": lambda: sgd_contenders(sizes, device, backends)}
    for name, make in makers.items():
        fns = make()
        per_param = BYTES[name]
        pyeff_bytes = per_param if isinstance(per_param, int) else per_param["pyeff"]
        fns[bench.CEILING] = copy_ceiling(numel, pyeff_bytes, device)
        host = {}
        times = timed_rounds(fns, rounds, device, host=host)
        nbytes = {k: (per_param if isinstance(per_param, int) else per_param.get(k, pyeff_bytes)) for k in fns}
        new = bench.rows_from_times("optim_gpu", f"{name} {len(sizes)} tensors {numel / 1e6:.0f}M", times,
                                    numel=numel, bytes_per_elem=nbytes, torch_providers=TORCH_PROVIDERS)
        if device.type == "cuda":
            kernels = {k: kernel_seconds(fn) for k, fn in fns.items()}
            for row in new:
                row.extra["host_ms"] = 1e3 * statistics.median(host[row.provider])
                row.extra["kernel_ms"] = 1e3 * kernels[row.provider]
                row.extra["kernel_pct_ceiling"] = 100 * kernels[bench.CEILING] / kernels[row.provider]
        rows += new
        del fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def triton_sweep(sizes, device, rounds) -> list[bench.Row]:
    """The Triton AdamW kernel's time for each (BLOCK, num_warps): the table kernels/_tables.py takes."""
    from pyeff.kernels import _tables

    saved = (_tables.BLOCK, _tables.NUM_WARPS)
    fns = {}
    step = adamw_contenders(sizes, device, ("triton",))["pyeff_triton"]
    for block, warps in ((512, 4), (1024, 4), (2048, 4), (2048, 8), (4096, 8)):
        def configured(block=block, warps=warps):
            _tables.BLOCK, _tables.NUM_WARPS = block, warps
            step()

        fns[f"triton BLOCK={block} warps={warps}"] = configured
    try:
        times = timed_rounds(fns, rounds, device)
    finally:
        _tables.BLOCK, _tables.NUM_WARPS = saved
    return bench.rows_from_times("optim_gpu", "triton adamw sweep", times, numel=sum(sizes), bytes_per_elem=28)


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    if not torch.cuda.is_available():
        print("optim_gpu: skipped (no CUDA device)")
        return []
    device = torch.device("cuda")
    backends = [b for b in ("cuda", "triton") if pyeff.ops.OPS["adam_step"].has(b)
                and pyeff.ops.backend_usable(b, device) is None]
    sizes = bench.model_like_sizes(TOTAL, COUNT)
    t0 = time.perf_counter()
    rows = run_cases(sizes, device, backends, rounds=5 if quick else 20)
    if quick and "triton" in backends:
        rows += triton_sweep(sizes, device, rounds=5)
    notes = {"backends": backends, "seconds": round(time.perf_counter() - t0, 1),
             "bytes_per_param": {k: v for k, v in BYTES.items()},
             "ceiling": "device-to-device copy of the bytes pyeff's step moves"}
    bench.save("optim_gpu", rows, out_dir, notes=notes)
    for case in dict.fromkeys(r.case for r in rows):
        best = {r.provider: r for r in rows if r.case == case}
        summary = ", ".join(f"{p} {r.ms:.2f} ms ({r.pct_ceiling or 0:.0f}% ceiling, "
                            f"{r.vs_best_torch or 0:.2f}x torch)" for p, r in best.items() if p != bench.CEILING)
        print(f"{case}: {summary}")
    return rows


if __name__ == "__main__":
    bench.cli(run)
