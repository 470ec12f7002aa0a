"""pyeff's CUDA pool as torch's allocator (pyeff.memory.use_cuda_pool) against torch's caching
allocator, on an allocation-heavy loop whose shapes change every step: a transformer block's
activations for a random sequence length, forward and backward, and the optimizer step. Each
allocator runs in a fresh process (one may only be chosen before CUDA is first used), with the same
seed; reported per allocator: time per step (CUDA events), peak reserved memory, and how many
cudaMalloc / cudaFree calls the run made. Skipped without a GPU or without the CUDA pool built.

    python benchmarks/gpu_pool.py [--quick]     (also: pyeff bench gpu_pool)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

LOOP = textwrap.dedent("""
    import json, random, sys, torch
    allocator, steps = sys.argv[1], int(sys.argv[2])
    if allocator == "pyeff_pool":
        import pyeff.memory
        pyeff.memory.use_cuda_pool()
    torch.manual_seed(0)
    random.seed(0)
    hidden, heads = 1024, 16
    block = torch.nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, batch_first=True, device="cuda",
                                             dtype=torch.bfloat16)
    opt = torch.optim.AdamW(block.parameters(), lr=1e-4)

    def step():
        seq = random.randrange(64, 1025)  # a new shape every step
        x = torch.randn(8, seq, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        block(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    after = torch.cuda.memory_stats()
    print(json.dumps({"times": times, "peak_reserved": after["reserved_bytes.all.peak"],
                      "mallocs": after["num_device_alloc"] - before["num_device_alloc"],
                      "frees": after["num_device_free"] - before["num_device_free"]}))
""")


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    if not torch.cuda.is_available():
        print("gpu_pool: no CUDA device, skipped")
        return []
    from pyeff import _ext

    if not _ext.built_with_cuda():
        print("gpu_pool: pyeff._C was built without the CUDA pool, skipped")
        return []
    steps = 40 if quick else 200
    results = {}
    for allocator in ("torch_caching", "pyeff_pool"):
        done = subprocess.run([sys.executable, "-c", LOOP, allocator, str(steps)], capture_output=True, text=True,
                              env=dict(os.environ), timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"gpu_pool: the {allocator} run failed:\n{done.stderr[-3000:]}")
        results[allocator] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = bench.rows_from_times("gpu_pool", f"TransformerEncoderLayer bf16, random seq, {steps} steps",
                                 {k: v["times"] for k, v in results.items()}, torch_providers=("torch_caching",))
    for row in rows:
        r = results[row.provider]
        row.extra.update(peak_reserved_MiB=r["peak_reserved"] / 2**20, cudaMalloc=r["mallocs"], cudaFree=r["frees"])
    bench.save("gpu_pool", rows, out_dir, notes={"method": "one fresh process per allocator, same seed"})
    return rows


if __name__ == "__main__":
    bench.cli(run)
