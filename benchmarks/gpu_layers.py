"""Fused layers on an NVIDIA GPU (the Triton kernels), forward + backward: pyeff vs eager torch and
torch.compile, against the card's measured copy bandwidth. Skipped without a GPU.

Each case times one forward and one backward (torch.autograd.grad, so no .grad accumulation adds
a pass) per provider with CUDA events, in interleaved rounds. Inputs are larger than the L2 cache
(60 MB on an H200), so no buffer rotation is needed. Bytes per element are what a fused forward +
backward must move (see benchmarks/nn_layers.py); the ceiling is a device-to-device copy of the
same number of bytes (read + write), measured in the same run. linear + cross-entropy also reports
the peak memory the step allocated (torch.cuda.max_memory_allocated over the step).

    python benchmarks/gpu_layers.py [--quick]     (also: pyeff bench gpu_layers)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

import pyeff.nn.functional as PF  # noqa: E402

TORCH_PROVIDERS = ("torch_eager", "torch_compile")


def _timed_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call, CUDA events around each call, contenders interleaved."""
    times = {k: [] for k in fns}
    for r in range(rounds + 2):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            if r >= 2:
                times[name].append(start.elapsed_time(end) / 1e3)
    return times


def _grad_step(forward, inputs, grad_outputs):
    wanted = [t for t in inputs if t.requires_grad]

    def step():
        out = forward(*inputs)
        return torch.autograd.grad(out, wanted, grad_outputs)

    return step


def _cases(rows: int, n: int, vocab: int, dtype):
    """name -> (elements, bytes per element a fused forward + backward moves, inputs, grad_outputs,
    pyeff function, torch function)."""
    dev, e = "cuda", dtype.itemsize
    x = torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, n, device=dev, dtype=dtype)
    gate_up = torch.randn(rows, 2 * n, device=dev, dtype=dtype, requires_grad=True)
    ce_rows = max(1, rows * n // vocab)
    logits = torch.randn(ce_rows, vocab, device=dev, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (ce_rows,), device=dev)
    one = torch.ones((), device=dev)
    return {
        "bias+GELU erf": (rows * n, 5 * e, (x, b), dy, lambda x, b: PF.bias_gelu(x, b), lambda x, b: F.gelu(x + b)),
        "LayerNorm": (rows * n, 5 * e, (x, w, b), dy, lambda x, w, b: PF.layer_norm(x, (n,), w, b),
                      lambda x, w, b: F.layer_norm(x, (n,), w, b)),
        "RMSNorm": (rows * n, 5 * e, (x, w), dy, lambda x, w: PF.rms_norm(x, (n,), w),
                    lambda x, w: F.rms_norm(x, (n,), w)),
        "SwiGLU packed": (rows * n, 8 * e, (gate_up,), dy, lambda t: PF.swiglu(t),
                          lambda t: F.silu(t[:, :n]) * t[:, n:]),
        # forward reads the logits and writes their gradient; the backward scales it (read + write)
        f"cross-entropy V={vocab}": (ce_rows * vocab, 4 * e, (logits,), one,
                                     lambda lg: PF.cross_entropy(lg, target).float(),
                                     lambda lg: F.cross_entropy(lg, target).float()),
    }


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    if not torch.cuda.is_available():
        print("gpu_layers: no CUDA device, skipped")
        return []
    rows, n, vocab = (4096, 1024, 32000) if quick else (16384, 4096, 128256)
    rounds = 10 if quick else 30
    out: list[bench.Row] = []
    for dtype in (torch.bfloat16,):  # the dtype of GPU training
        cases = _cases(rows, n, vocab, dtype)
        # the ceiling: a device-to-device copy (read + write) of a buffer of the same size as x
        src = torch.randn(rows * n * 4 // dtype.itemsize, device="cuda", dtype=dtype)
        dst = torch.empty_like(src)
        copy_s = statistics.median(_timed_rounds({"copy": lambda: dst.copy_(src)}, rounds)["copy"])
        copy_bw = 2 * src.numel() * src.element_size() / copy_s
        for case, (numel, nbytes, inputs, dy, fused, eager) in cases.items():
            fns = {"pyeff_triton": _grad_step(fused, inputs, dy), "torch_eager": _grad_step(eager, inputs, dy),
                   "torch_compile": _grad_step(torch.compile(eager), inputs, dy)}
            for fn in fns.values():
                fn()
            times = _timed_rounds(fns, rounds)
            label = f"{case} {str(dtype).replace('torch.', '')}"
            case_rows = bench.rows_from_times("gpu_layers", label, times, numel=numel, bytes_per_elem=nbytes,
                                              torch_providers=TORCH_PROVIDERS)
            for row in case_rows:
                row.pct_ceiling = 100 * row.gbps * 1e9 / copy_bw
                row.extra["copy_GBps"] = copy_bw / 1e9
            out += case_rows
        out += _linear_cross_entropy_memory(dtype, quick)
    bench.save("gpu_layers", out, out_dir, notes={"ceiling": "device-to-device copy bandwidth, same run"})
    return out


def _linear_cross_entropy_memory(dtype, quick) -> list[bench.Row]:
    """Time and peak memory of the LM head + loss: pyeff's chunked op vs eager linear + cross_entropy."""
    tokens, hidden, vocab = (2048, 1024, 32000) if quick else (8192, 4096, 128256)
    h = torch.randn(tokens, hidden, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=dtype) * hidden**-0.5).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device="cuda")
    fns = {
        "pyeff_triton": lambda: torch.autograd.grad(PF.linear_cross_entropy(h, w, t), (h, w)),
        "torch_eager": lambda: torch.autograd.grad(F.cross_entropy(F.linear(h, w).float(), t), (h, w)),
    }
    peaks = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = _timed_rounds(fns, 5 if quick else 10)
    label = f"linear+CE T={tokens} H={hidden} V={vocab} {str(dtype).replace('torch.', '')}"
    rows = bench.rows_from_times("gpu_layers", label, times, torch_providers=("torch_eager",))
    for row in rows:
        row.extra["peak_MiB"] = peaks[row.provider]
        row.extra["peak_vs_eager"] = peaks[row.provider] / peaks["torch_eager"]
    return rows


if __name__ == "__main__":
    bench.cli(run)
