"""AdamW with compressed state: step time and state bytes per parameter for fp32, bf16 and int8
moments (pyeff `state_dtype=`), vs torch fused/foreach AdamW (fp32 state) and the 8-bit AdamW of
torchao and bitsandbytes where they import and run on the device (skipped with a note otherwise).

Bytes per parameter moved by a step: fp32 state 28 (read p, g, m, v; write p, m, v), bf16 state 20,
int8 state 14 (+1/32 for the block scales). The step is memory-bound, so its time should shrink
with the bytes: the ratios to pyeff's fp32-state step are in the notes (`vs_fp32_state`). On the CPU
the fp32 ceiling (the in-place loop over the same 4 read / 3 written fp32 arrays) is timed in the
same run; on a GPU the same contenders run with pyeff's CUDA and Triton backends.

    python benchmarks/optim_state.py [--quick]     (also: pyeff bench optim_state)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

import pyeff  # noqa: E402

HYPER = dict(lr=1e-3, weight_decay=1e-2)
BYTES = {"fp32": 28, "bf16": 20, "int8": 14 + 1 / 32}
STATES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8"}
TORCH_PROVIDERS = ("torch_fused", "torch_foreach")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every state tensor but the step counts (a tensor subclass, such as torchao's 8-bit
    state, counts its inner tensors; bitsandbytes' shared 256-entry code maps count once)."""
    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
        elif t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for s in opt.state.values():
        for key, v in s.items():
            if torch.is_tensor(v) and key != "step":
                add(v)
    return total


def peers(params) -> tuple[dict[str, torch.optim.Optimizer], dict[str, str]]:
    """The 8-bit AdamWs of torchao and bitsandbytes that construct and step here, and notes on the others."""
    opts, notes = {}, {}
    for name, load in (("torchao_adamw8bit", lambda: __import__("torchao.optim", fromlist=["AdamW8bit"]).AdamW8bit),
                       ("bnb_adamw8bit", lambda: __import__("bitsandbytes.optim", fromlist=["AdamW8bit"]).AdamW8bit)):
        try:
            opt = load()(params, **HYPER)
            opt.step()
            opts[name] = opt
        except Exception as e:  # not installed, or no kernel for this device
            notes[name] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return opts, notes


def contenders(problem: bench.SharedBuffers | None, params, device: str, backend: str | None):
    """{name: (step, state bytes)} over the same parameters and gradients; fp32-state contenders
    share the problem's moments (CPU), the others keep their own."""
    suffix = f"_{backend}" if backend else ""
    opts = {f"pyeff{suffix}_{k}": pyeff.optim.AdamW(params, **HYPER, state_dtype=dtype, backend=backend)
            for k, dtype in STATES.items()}
    opts["torch_fused"] = torch.optim.AdamW(params, **HYPER, fused=True)
    opts["torch_foreach"] = torch.optim.AdamW(params, **HYPER, foreach=True)
    for opt in opts.values():
        opt.step()  # creates the state
    if problem is not None:
        for name in (f"pyeff{suffix}_fp32", "torch_fused", "torch_foreach"):
            problem.share_state(opts[name], params, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"})
    peer_opts, notes = peers(params)
    opts.update(peer_opts)
    return {name: (opt.step, state_bytes(opt)) for name, opt in opts.items()}, notes


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    cpu_sizes = bench.model_like_sizes() if not quick else bench.model_like_sizes(3_000_000)
    gpu_sizes = bench.model_like_sizes(256_000_000, 300)  # a GPU step takes milliseconds even so
    rounds = 5 if quick else 15
    rows, notes = [], {"hyper": ", ".join(f"{k}={v}" for k, v in HYPER.items()),
                       "bytes": "per parameter moved: fp32 state 28, bf16 20, int8 14 (+1/32 block scales)",
                       "ceiling": "in-place loop reading 4 and writing 3 fp32 arrays (CPU)"}
    runs = [("cpu", None)]
    if torch.cuda.is_available():
        runs += [("cuda", "cuda"), ("cuda", "triton")]
    for device, backend in runs:
        sizes = cpu_sizes if device == "cpu" else gpu_sizes
        numel = sum(sizes)
        case = f"{len(sizes)} tensors {numel / 1e6:.0f}M"
        if device == "cpu":
            problem = bench.SharedBuffers(sizes, dict.fromkeys(("param", "grad", "exp_avg", "exp_avg_sq"),
                                                                torch.float32))
            params = problem.parameters()
        else:
            problem, g = None, torch.Generator(device).manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(n, device=device, generator=g)) for n in sizes]
            for p in params:
                p.grad = torch.randn(p.shape, device=device, generator=g)
        entries, skipped = contenders(problem, params, device, backend)
        notes.update({f"{device} {k}": v for k, v in skipped.items()})
        fns = {name: step for name, (step, _) in entries.items()}
        if problem is not None:
            flat = problem.flat
            fns[bench.CEILING] = lambda: torch.ops.pyeff.stream_inplace_cpu(
                [flat["param"], flat["exp_avg"], flat["exp_avg_sq"]], [flat["grad"]])
        for fn in fns.values():  # compile (torchao) / first touch outside the timed rounds
            fn()
        times = bench.interleaved(fns, rounds, device=device, label=f"optim_state {device} {backend or ''}")
        moved = {name: BYTES[name.rsplit("_", 1)[1]] if name.startswith("pyeff") else None for name in fns}
        moved.update({name: BYTES["fp32"] for name in (*TORCH_PROVIDERS, bench.CEILING)})
        new = bench.rows_from_times("adamw_state", f"{device} {case}", times, numel=numel, bytes_per_elem=moved,
                                    torch_providers=TORCH_PROVIDERS)
        fp32_ms = next(r.ms for r in new if r.provider.startswith("pyeff") and r.provider.endswith("_fp32"))
        for r in new:
            if r.provider in entries:
                r.extra["state_B_per_param"] = entries[r.provider][1] / numel
                r.extra["vs_fp32_state"] = r.ms / fp32_ms
        rows += new
        del fns, entries, params, problem
    bench.save("optim_state", rows, out_dir, notes=notes)
    return rows


if __name__ == "__main__":
    bench.cli(run)
