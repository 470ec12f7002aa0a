"""Losses on the CPU: pyeff's cross-entropy and linear + cross-entropy against eager torch and
torch.compile, forward + backward, in one run.

Cases
- cross_entropy, fp32 and bf16 logits (N x C, C = 32000; a leaf that requires grad, target with a
  few ignored rows): providers pyeff_cpu, torch_eager, torch_compile (full runs only: compiling
  takes ~15 s per case). pyeff reads the logits once from memory and writes their gradient once,
  in the forward; the backward of loss.backward() hands that gradient on. So bytes per element =
  2 x element size, and the ceiling is the in-place loop reading and writing that many bytes
  (stream_inplace over one fp32 array of the same byte size), measured in the same run.
  Target: pyeff at least 1.3x eager.
- linear_cross_entropy, fp32: hidden N x H, weight V x H, V = 32000, against
  cross_entropy(linear(hidden, weight), target) in eager and compiled torch. The matrix products
  dominate (no bandwidth ceiling). Targets: time at most 1.2x eager; peak memory at most 20 % of
  eager's.

Timing: contenders interleaved round by round (benchmarks/_common.py), median and spread.

Peak memory, measured honestly: each provider runs in its own fresh Python process started with
MALLOC_MMAP_THRESHOLD_=65536, so that glibc maps every block of 64 KiB or more on its own and
returns it to the system on free: the resident set then follows the live tensors, with no freed
memory cached in the heap to hide a later allocation. In that process one untimed step runs first
(compilation, first touch of the inputs), the gradients are dropped, the kernel's peak-RSS counter
is reset (`5` written to /proc/self/clear_refs), then one forward + backward runs; the step's peak
is VmHWM minus the VmRSS before the step (the gradients that remain count, for every provider).
Where clear_refs cannot be written, the step runs without the warm-up and the peak is ru_maxrss
minus the RSS before it.

    python benchmarks/nn_loss.py [--quick]     (also: pyeff bench nn_loss)
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

import pyeff  # noqa: E402

SUITE = "nn_loss"
TORCH_PROVIDERS = ("torch_eager", "torch_compile")


# ---------------------------------------------------------------- problems


def _ce_inputs(n, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 2).to(dtype).requires_grad_()
    t = torch.randint(0, c, (n,), generator=g)
    t[::17] = -100
    return x, t


def _lce_inputs(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::17] = -100
    return hidden, weight, t


def _loss_fn(kind: str, provider: str):
    if kind == "ce":
        fn = pyeff.nn.functional.cross_entropy if provider == "pyeff_cpu" else F.cross_entropy
    elif provider == "pyeff_cpu":
        fn = pyeff.nn.functional.linear_cross_entropy
    else:
        def fn(hidden, weight, t):
            return F.cross_entropy(F.linear(hidden, weight), t)
    return torch.compile(fn) if provider == "torch_compile" else fn


def make_step(kind: str, provider: str, dims: tuple, dtype: torch.dtype):
    """A forward + backward of one provider on its own inputs, as a no-argument callable."""
    inputs = _ce_inputs(*dims, dtype) if kind == "ce" else _lce_inputs(*dims, dtype)
    leaves = [x for x in inputs if x.requires_grad]
    fn = _loss_fn(kind, provider)

    def step():
        for x in leaves:
            x.grad = None
        fn(*inputs).backward()

    return step, leaves


# ---------------------------------------------------------------- peak memory, in a fresh process


def _status_bytes(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def probe_memory(kind: str, provider: str, dims: tuple, dtype_name: str, threads: int) -> dict:
    """Runs in the child process: the peak extra resident memory of one step (module docstring)."""
    torch.set_num_threads(threads)
    step, leaves = make_step(kind, provider, dims, getattr(torch, dtype_name))
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    if resettable:
        step()  # compile, first touch
        for x in leaves:
            x.grad = None
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_bytes("VmRSS")
        step()
        return {"peak_bytes": _status_bytes("VmHWM") - base, "method": "VmHWM after clear_refs"}
    gc.collect()
    base = _status_bytes("VmRSS")
    step()
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, "method": "ru_maxrss"}


def peak_memory(kind: str, provider: str, dims: tuple, dtype: torch.dtype) -> dict:
    spec = json.dumps([kind, provider, list(dims), str(dtype).removeprefix("torch."), torch.get_num_threads()])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe-memory", spec], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nn_loss: the memory probe of {provider} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the suite


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    providers = ["pyeff_cpu", "torch_eager"] + ([] if quick else ["torch_compile"])
    rows: list[bench.Row] = []
    summary = []

    ce_dims = (256, 32000) if quick else (2048, 32000)
    for dtype in (torch.float32, torch.bfloat16):
        case = f"cross_entropy {str(dtype).removeprefix('torch.')} {ce_dims[0]}x{ce_dims[1]}"
        fns = {p: make_step("ce", p, ce_dims, dtype)[0] for p in providers}
        numel = ce_dims[0] * ce_dims[1]
        elem = torch.finfo(dtype).bits // 8
        ceiling = bench.ceiling_cpu(numel * elem // 4, read_write=1, read_only=0)  # the same bytes, in place
        fns[bench.CEILING] = ceiling
        for fn in fns.values():
            fn()
        rounds = 3 if quick else 10
        times = bench.interleaved(fns, rounds, label=case)
        case_rows = bench.rows_from_times(SUITE, case, times, numel=numel, bytes_per_elem=2 * elem,
                                          torch_providers=TORCH_PROVIDERS)
        _add_vs_eager(case_rows)
        rows += case_rows
        summary.append(f"{case}: pyeff {_row(case_rows, 'pyeff_cpu').extra['vs_eager']:.2f}x eager (target >= 1.3x)")
        del fns

    lce_dims = (512, 128, 32000) if quick else (2048, 256, 32000)
    case = f"linear_cross_entropy float32 N={lce_dims[0]} H={lce_dims[1]} V={lce_dims[2]}"
    fns = {p: make_step("lce", p, lce_dims, torch.float32)[0] for p in providers}
    for fn in fns.values():
        fn()
    rounds = 3 if quick else 6
    times = bench.interleaved(fns, rounds, label=case)
    del fns
    case_rows = bench.rows_from_times(SUITE, case, times, torch_providers=TORCH_PROVIDERS)
    _add_vs_eager(case_rows)
    peaks = {p: peak_memory("lce", p, lce_dims, torch.float32) for p in providers}
    for r in case_rows:
        r.extra["peak_mib"] = peaks[r.provider]["peak_bytes"] / 2**20
        r.extra["peak_vs_eager"] = peaks[r.provider]["peak_bytes"] / peaks["torch_eager"]["peak_bytes"]
        r.extra["peak_method"] = peaks[r.provider]["method"]
    rows += case_rows
    mine = _row(case_rows, "pyeff_cpu")
    summary.append(f"{case}: pyeff time {1 / mine.extra['vs_eager']:.2f}x eager's (target <= 1.2x), peak memory "
                   f"{mine.extra['peak_mib']:.0f} MiB = {100 * mine.extra['peak_vs_eager']:.0f}% of eager's "
                   f"{_row(case_rows, 'torch_eager').extra['peak_mib']:.0f} MiB (target <= 20%)")

    bench.save(SUITE, rows, out_dir, notes={"summary": summary, "ceiling": "in-place loop over the same bytes as "
                                            "one read of the logits and one write of their gradient"})
    print("\n".join(summary))
    return rows


def _row(rows, provider):
    return next(r for r in rows if r.provider == provider)


def _add_vs_eager(rows):
    eager = _row(rows, "torch_eager").ms
    for r in rows:
        if r.provider != bench.CEILING:
            r.extra["vs_eager"] = eager / r.ms


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe-memory":
        kind, provider, dims, dtype_name, threads = json.loads(sys.argv[2])
        print(json.dumps(probe_memory(kind, provider, tuple(dims), dtype_name, threads)))
    else:
        bench.cli(run)
