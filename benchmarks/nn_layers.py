"""Fused layers on the CPU, forward + backward: pyeff vs eager torch and torch.compile, against the ceiling.

Each case times one forward and one backward (torch.autograd.grad, so that no .grad accumulation
adds a pass) of the same inputs for every provider, interleaved. Bytes per element count what the
fused kernels must move, in fp32:

    bias + GELU     forward reads x, writes y; backward reads dy, x, writes dx         3 R + 2 W = 20 B
    LayerNorm       the same (plus per-row statistics and the weight, negligible)     3 R + 2 W = 20 B
    RMSNorm         the same                                                          3 R + 2 W = 20 B
    add + LayerNorm forward reads x, r, writes y, h; backward reads dy, dh, h, writes dx  5 R + 3 W = 32 B
    SwiGLU (packed, per output element) forward reads 2, writes 1; backward reads 3, writes 2  5 R + 3 W = 32 B

The ceiling is the in-place loop over as many arrays (torch.ops.pyeff.stream_inplace_cpu with
read_write = W and read_only = R - W), measured in the same run. The fused kernels also write into
freshly allocated outputs, which the in-place ceiling does not pay for.

    python benchmarks/nn_layers.py [--quick]     (also: pyeff bench nn_layers)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

import pyeff  # noqa: E402
import pyeff.nn.functional as PF  # noqa: E402

TORCH_PROVIDERS = ("torch_eager", "torch_compile")


def _grad_step(forward, inputs, grads_out):
    """One forward and backward: autograd.grad of forward(*inputs) w.r.t. the inputs needing grads."""
    wanted = [t for t in inputs if t.requires_grad]

    def step():
        out = forward(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, wanted, grads_out[: len(outs)])

    return step


def _case_bias_gelu(rows, n, approximate):
    x = torch.randn(rows, n, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    dy = [torch.randn(rows, n)]
    return {
        "pyeff": lambda x, b: PF.bias_gelu(x, b, approximate),
        "torch": lambda x, b: F.gelu(x + b, approximate=approximate),
    }, (x, b), dy, (2, 1)


def _case_norm(rows, n, rms):
    x = torch.randn(rows, n, requires_grad=True)
    w = torch.randn(n, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    dy = [torch.randn(rows, n)]
    if rms:
        return {
            "pyeff": lambda x, w: PF.rms_norm(x, (n,), w, 1e-6),
            "torch": lambda x, w: F.rms_norm(x, (n,), w, 1e-6),
        }, (x, w), dy, (2, 1)
    return {
        "pyeff": lambda x, w, b: PF.layer_norm(x, (n,), w, b),
        "torch": lambda x, w, b: F.layer_norm(x, (n,), w, b),
    }, (x, w, b), dy, (2, 1)


def _torch_add_layer_norm(x, r, w, b):
    h = x + r
    return F.layer_norm(h, (h.shape[-1],), w, b), h


def _case_add_layer_norm(rows, n):
    x = torch.randn(rows, n, requires_grad=True)
    r = torch.randn(rows, n, requires_grad=True)
    w = torch.randn(n, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    dys = [torch.randn(rows, n), torch.randn(rows, n)]
    return {
        "pyeff": lambda x, r, w, b: PF.add_layer_norm(x, r, (n,), w, b),
        "torch": _torch_add_layer_norm,
    }, (x, r, w, b), dys, (3, 2)


def _torch_swiglu(x):
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def _case_swiglu(rows, n):
    x = torch.randn(rows, 2 * n, requires_grad=True)
    dy = [torch.randn(rows, n)]
    return {"pyeff": lambda x: PF.swiglu(x), "torch": _torch_swiglu}, (x,), dy, (3, 2)


def _problems(quick: bool) -> dict:
    """case name -> (rows, n, case maker, bytes per element). Full size: 4096 tokens x 1024 features
    (16 MB fp32 tensors, which malloc recycles), and bias + GELU at the width of an MLP's hidden layer
    (64 MB tensors: fresh pages from the OS for every output, as in large-model training)."""
    r, n = (1024, 1024) if quick else (4096, 1024)
    problems = {
        "bias+gelu erf": (r, n, lambda: _case_bias_gelu(r, n, "none"), 20),
        "bias+gelu tanh": (r, n, lambda: _case_bias_gelu(r, n, "tanh"), 20),
        "layernorm": (r, n, lambda: _case_norm(r, n, rms=False), 20),
        "rmsnorm": (r, n, lambda: _case_norm(r, n, rms=True), 20),
        "add+layernorm": (r, n, lambda: _case_add_layer_norm(r, n), 32),
        "swiglu packed": (r, n, lambda: _case_swiglu(r, n), 32),
    }
    if not quick:
        problems["bias+gelu erf (MLP width)"] = (r, 4 * n, lambda: _case_bias_gelu(r, 4 * n, "none"), 20)
    return {f"{name} {rows}x{cols}": (rows, cols, make, b) for name, (rows, cols, make, b) in problems.items()}


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    rounds = 5 if quick else 15
    rows = []
    speedups = {}
    for case, (r, n, make, bytes_per_elem) in _problems(quick).items():
        fns, inputs, dys, (writes, reads_only) = make()
        numel = r * n
        contenders = {
            "pyeff_cpu": _grad_step(fns["pyeff"], inputs, dys),
            "torch_eager": _grad_step(fns["torch"], inputs, dys),
        }
        if not quick:
            contenders["torch_compile"] = _grad_step(torch.compile(fns["torch"], dynamic=False), inputs, dys)
        contenders[bench.CEILING] = bench.ceiling_cpu(numel, read_write=writes, read_only=reads_only)
        for fn in contenders.values():  # compile / first touch outside the timed rounds
            fn()
        times = bench.interleaved(contenders, rounds, label=f"nn_layers {case}")
        case_rows = bench.rows_from_times("nn_layers", case, times, numel=numel, bytes_per_elem=bytes_per_elem,
                                          torch_providers=TORCH_PROVIDERS)
        eager = next(row.ms for row in case_rows if row.provider == "torch_eager")
        for row in case_rows:
            if row.provider != bench.CEILING:
                row.extra["vs_torch_eager"] = eager / row.ms
        speedups[case] = eager / next(row.ms for row in case_rows if row.provider == "pyeff_cpu")
        rows += case_rows
        del contenders, inputs, dys
    bench.save("nn_layers", rows, out_dir, notes={
        "ceiling": "in-place loop over the arrays the fused forward + backward reads and writes (see docstring)",
        "timed": "one forward + one backward (torch.autograd.grad) per call, fp32",
        "pyeff_vs_torch_eager": speedups})
    print("pyeff_cpu vs torch_eager (forward + backward): "
          + ", ".join(f"{case} {s:.2f}x" for case, s in speedups.items()))
    return rows


if __name__ == "__main__":
    bench.cli(run)
