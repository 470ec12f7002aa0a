"""Fused layers on an NVIDIA GPU (the Triton kernels), forward + backward, fp32 and bf16: pyeff vs
eager torch, torch.compile and Liger-Kernel (`pip install liger-kernel`), and for the LM head +
loss also cut-cross-entropy (`pip install cut-cross-entropy`); a provider that is not installed
(or that has no kernel for a case: Liger has no plain GELU) is skipped with a note. Skipped without
a GPU.

Each case times one forward and one backward (torch.autograd.grad, so no .grad accumulation adds
a pass) per provider with CUDA events, in interleaved rounds. Inputs are larger than the L2 cache
(60 MB on an H200), so no buffer rotation is needed. Bytes per element are what a fused forward +
backward must move (see benchmarks/nn_layers.py; cross-entropy: read the logits, write their
gradient); the ceiling is a device-to-device copy of the same number of bytes (read + write),
measured in the same run. linear + cross-entropy also reports the peak memory the step allocated
above its inputs (torch.cuda.max_memory_allocated over the step).

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


def _first(out):
    """Liger's losses return (loss, z_loss, ...) in recent versions, the loss alone in older ones."""
    return out[0] if isinstance(out, tuple) else out


def liger_kernels() -> tuple[dict | None, str | None]:
    """Liger-Kernel's autograd functions by case, or None and why not."""
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError as e:
        return None, f"Liger-Kernel not available ({e}); pip install liger-kernel"
    return {
        "LayerNorm": lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5),
        "RMSNorm": lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6),
        "SwiGLU": lambda a, b: LigerSiLUMulFunction.apply(a, b),
        "cross-entropy": lambda lg, t: _first(LigerCrossEntropyFunction.apply(lg, t, None)),  # weight=None
        "linear+CE": lambda h, w, t: _first(LigerFusedLinearCrossEntropyFunction.apply(h, w, t)),
    }, None


def cut_cross_entropy() -> tuple[object | None, str | None]:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        return None, f"cut-cross-entropy not available ({e}); pip install cut-cross-entropy"
    return linear_cross_entropy, None


def _cases(rows: int, n: int, vocab: int, dtype, liger: dict | None):
    """name -> (elements, bytes per element a fused forward + backward moves, inputs, grad_outputs,
    {provider: function, or (function, its own inputs)})."""
    dev, e = "cuda", dtype.itemsize

    def leaf(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)

    x, w, b, a, g = leaf(rows, n), leaf(n), leaf(n), leaf(rows, n), leaf(rows, n)
    dy = torch.randn(rows, n, device=dev, dtype=dtype)
    one = torch.ones((), device=dev)
    cases = {
        "GELU": (rows * n, 4 * e, (x,), dy, {"pyeff_triton": lambda x: PF.bias_gelu(x), "torch_eager": F.gelu}),
        "bias+GELU tanh": (rows * n, 5 * e, (x, b), dy, {
            "pyeff_triton": lambda x, b: PF.bias_gelu(x, b, approximate="tanh"),
            "torch_eager": lambda x, b: F.gelu(x + b, approximate="tanh")}),
        "LayerNorm": (rows * n, 5 * e, (x, w, b), dy, {
            "pyeff_triton": lambda x, w, b: PF.layer_norm(x, (n,), w, b),
            "torch_eager": lambda x, w, b: F.layer_norm(x, (n,), w, b)}),
        "RMSNorm": (rows * n, 5 * e, (x, w), dy, {
            "pyeff_triton": lambda x, w: PF.rms_norm(x, (n,), w), "torch_eager": lambda x, w: F.rms_norm(x, (n,), w)}),
        "SwiGLU": (rows * n, 8 * e, (a, g), dy, {
            "pyeff_triton": lambda a, g: PF.swiglu(a, g), "torch_eager": lambda a, g: F.silu(a) * g}),
    }
    for label, ce_rows in ((f"cross-entropy V={vocab}", max(1, rows * n // vocab)),
                           (f"cross-entropy V={vocab} 8 rows", 8)):  # few rows: each split over programs
        logits = leaf(ce_rows, vocab)
        target = torch.randint(0, vocab, (ce_rows,), device=dev)
        cases[label] = (ce_rows * vocab, 2 * e, (logits,), one, {
            "pyeff_triton": lambda lg, t=target: PF.cross_entropy(lg, t).float(),
            "torch_eager": lambda lg, t=target: F.cross_entropy(lg, t).float()})
        if liger is not None:  # Liger writes the gradient over its input: give it its own
            mine = logits.detach().clone().requires_grad_()
            cases[label][4]["liger"] = (lambda lg, t=target: liger["cross-entropy"](lg, t).float(), (mine,))
    for name, (_, _, _, _, fns) in cases.items():
        fns["torch_compile"] = torch.compile(fns["torch_eager"])
        if liger is not None and name in liger:
            fns["liger"] = liger[name]
    return cases


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    if not torch.cuda.is_available():
        print("gpu_layers: no CUDA device, skipped")
        return []
    rows, n, vocab = (4096, 2048, 32000) if quick else (16384, 4096, 128256)
    rounds = 10 if quick else 30
    liger, liger_note = liger_kernels()
    notes = {"ceiling": "device-to-device copy bandwidth, same run"}
    if liger_note:
        notes["liger"] = liger_note
        print(f"gpu_layers: {liger_note}")
    notes["GELU"] = "Liger-Kernel has no plain GELU kernel (only GEGLU)"
    out: list[bench.Row] = []
    for dtype in (torch.bfloat16,) if quick else (torch.float32, torch.bfloat16):
        # the ceiling: a device-to-device copy (read + write) of a buffer of the same size as x
        src = torch.randn(rows * n * 4 // dtype.itemsize, device="cuda", dtype=dtype)
        dst = torch.empty_like(src)
        copy_s = statistics.median(_timed_rounds({"copy": lambda: dst.copy_(src)}, rounds)["copy"])
        copy_bw = 2 * src.numel() * src.element_size() / copy_s
        del src, dst
        for case, (numel, nbytes, inputs, dy, fns) in _cases(rows, n, vocab, dtype, liger).items():
            steps = {name: _grad_step(*(fn if isinstance(fn, tuple) else (fn, inputs)), dy)
                     for name, fn in fns.items()}
            for fn in steps.values():
                fn()
            times = _timed_rounds(steps, rounds)
            label = f"{case} {str(dtype).replace('torch.', '')}"
            case_rows = bench.rows_from_times("gpu_layers", label, times, numel=numel, bytes_per_elem=nbytes,
                                              torch_providers=TORCH_PROVIDERS)
            for row in case_rows:
                row.pct_ceiling = 100 * row.gbps * 1e9 / copy_bw
                row.extra["copy_GBps"] = copy_bw / 1e9
                if "liger" in times and row.provider != "liger":
                    row.extra["vs_liger"] = statistics.median(times["liger"]) / statistics.median(times[row.provider])
            out += case_rows
        out += _linear_cross_entropy(dtype, quick, liger, notes)
    bench.save("gpu_layers", out, out_dir, notes=notes)
    return out


def _linear_cross_entropy(dtype, quick, liger, notes) -> list[bench.Row]:
    """Time and peak memory of the LM head + loss: pyeff's chunked op vs eager linear + cross_entropy
    (logits upcast to fp32, as training code does), Liger's and cut-cross-entropy's fused ones."""
    tokens, hidden, vocab = (2048, 1024, 32000) if quick else (8192, 4096, 128256)
    h = torch.randn(tokens, hidden, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=dtype) * hidden**-0.5).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device="cuda")
    losses = {
        "pyeff_triton": lambda: PF.linear_cross_entropy(h, w, t),
        "torch_eager": lambda: F.cross_entropy(F.linear(h, w).float(), t),
    }
    if liger is not None:
        losses["liger"] = lambda: liger["linear+CE"](h, w, t)
    cce, cce_note = cut_cross_entropy()
    if cce is None:
        notes["cut_cross_entropy"] = cce_note
        print(f"gpu_layers: {cce_note}")
    elif dtype != torch.float32:  # its kernels take bf16/fp16
        losses["cut_cross_entropy"] = lambda: cce(h, w, t)
    fns = {name: (lambda loss=loss: torch.autograd.grad(loss(), (h, w))) for name, loss in losses.items()}
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
        if "cut_cross_entropy" in times and row.provider != "cut_cross_entropy":
            row.extra["vs_cce"] = statistics.median(times["cut_cross_entropy"]) / statistics.median(times[row.provider])
    return rows


if __name__ == "__main__":
    bench.cli(run)
