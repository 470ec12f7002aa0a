"""Caching memory pool: an allocation-heavy training loop with each CPU allocator, and the
flat-buffer optimizer step.

1. Training loop: transformer blocks whose attention is written out (scores, softmax, dropout as
   separate tensors of B x heads x T x T, 32-64 MiB each at full size) trained with
   pyeff.optim.AdamW on batches whose size varies from step to step. Every step allocates and frees
   hundreds of MiB in tensors of changing sizes: glibc malloc maps those above its mmap threshold
   (32 MiB at most) afresh each time and the kernel faults and zeroes every page again. Contenders,
   each a subprocess running the same loop on the same batches, timed in interleaved rounds:
   `glibc` (torch's default), `pyeff_pool` (pyeff.memory.enable()), `jemalloc` and `tcmalloc`
   (Debian's libjemalloc2 and libtcmalloc-minimal4 through LD_PRELOAD; skipped with a note when the
   library is absent; PYEFF_BENCH_JEMALLOC / PYEFF_BENCH_TCMALLOC give other paths). Reported per
   contender: median step time (over rounds; a round runs each batch size once, in an order drawn
   per round and shared by all contenders, after a warm-up step with each size), minor page faults
   per step, the process's peak RSS, and the ratios to glibc and to the better of jemalloc/tcmalloc.
2. Flat buffers: one pyeff.optim.AdamW step over the same model's parameters kept as separate
   tensors (`pyeff_separate`), flattened by pyeff.memory.flatten_parameters (`pyeff_flattened`,
   what the optimizer sees today: views, one per parameter), and as the one flat buffer they form
   (`pyeff_one_buffer`, what an optimizer that recognises the buffer would run), against the
   in-place ceiling of the same bytes.

    python benchmarks/memory.py [--quick]     (also: pyeff bench memory)
"""

from __future__ import annotations

import ctypes.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

import pyeff  # noqa: E402

PRELOADS = {  # name: (environment variable with a path, library name, Debian soname, Debian package)
    "jemalloc": ("PYEFF_BENCH_JEMALLOC", "jemalloc", "libjemalloc.so.2", "libjemalloc2"),
    "tcmalloc": ("PYEFF_BENCH_TCMALLOC", "tcmalloc_minimal", "libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")

# Width, heads, sequence length, layers; the batch sizes, each used once per round in a shuffled
# order (the same for every contender, and a step with each size first, to warm up); rounds.
FULL = dict(d=256, heads=8, seq=512, layers=2, batches=(4, 5, 6, 7, 8), rounds=9)
QUICK = dict(d=128, heads=8, seq=512, layers=1, batches=(5, 8), rounds=2)


# ---------------------------------------------------------------- the training loop


class Block(nn.Module):
    """A pre-norm transformer block with the attention written out, as in minGPT."""

    def __init__(self, d: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        att = F.dropout(att.softmax(-1), self.dropout)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + F.dropout(self.proj(y), self.dropout)
        return x + F.dropout(self.fc2(F.gelu(self.fc1(self.ln2(x)))), self.dropout)


def make_model(cfg: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(cfg["d"], cfg["heads"]) for _ in range(cfg["layers"])])


def worker(name: str, cfg: dict) -> None:
    """Run the loop on command: read `run N` on stdin, answer one JSON line per command."""
    if name == "pyeff_pool":
        pyeff.memory.enable()
    model = make_model(cfg)
    opt = pyeff.optim.AdamW(model.parameters(), lr=1e-4)
    rng = random.Random(0)
    torch.manual_seed(1)

    def step(batch: int):
        x = torch.randn(batch, cfg["seq"], cfg["d"])
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    for batch in cfg["batches"]:
        step(batch)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        before = resource.getrusage(resource.RUSAGE_SELF)
        times = []
        for batch in rng.sample(cfg["batches"], len(cfg["batches"])):
            t0 = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"times": times, "minflt": after.ru_minflt - before.ru_minflt,
                          "majflt": after.ru_majflt - before.ru_majflt, "maxrss_kib": after.ru_maxrss,
                          "pool": pyeff.memory.stats() if name == "pyeff_pool" else None}), flush=True)


def find_library(name: str) -> str | None:
    env, short, soname, _ = PRELOADS[name]
    if os.environ.get(env):
        return os.environ[env] if Path(os.environ[env]).exists() else None
    for d in LIB_DIRS:
        if (Path(d) / soname).exists():
            return str(Path(d) / soname)
    found = ctypes.util.find_library(short)
    return found if found and Path(found).is_absolute() and Path(found).exists() else None


def start_workers(cfg: dict, notes: dict) -> dict[str, subprocess.Popen]:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    contenders = {"glibc": env, "pyeff_pool": env}
    for name in PRELOADS:
        lib = find_library(name)
        if lib is None:
            env_var, _, soname, package = PRELOADS[name]
            notes.setdefault("skipped", {})[name] = (f"{soname} not found (Debian: apt-get install {package}, or set "
                                                     f"{env_var} to its path)")
            print(f"memory: skipping {name}: {notes['skipped'][name]}", file=sys.stderr)
            continue
        contenders[name] = {**env, "LD_PRELOAD": lib}
    procs = {}
    for name, e in contenders.items():
        procs[name] = subprocess.Popen([sys.executable, __file__, "--worker", name, "--config", json.dumps(cfg)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=e)
    for name, p in procs.items():
        if p.stdout.readline().strip() != "ready":
            for other in procs.values():
                other.kill()
            raise RuntimeError(f"memory benchmark worker {name} failed to start (exit code {p.wait()})")
    return procs


def training_loop(cfg: dict, case: str, notes: dict) -> list[bench.Row]:
    procs = start_workers(cfg, notes)
    results: dict[str, list[dict]] = {name: [] for name in procs}
    progress = bench.Progress(cfg["rounds"] * len(procs), f"memory {case}")
    try:
        for _ in range(cfg["rounds"]):  # interleaved: each round runs every contender once, in turn
            for name, p in procs.items():
                p.stdin.write("run\n")
                p.stdin.flush()
                results[name].append(json.loads(p.stdout.readline()))
                progress.tick()
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    times = {name: [statistics.mean(r["times"]) for r in rs] for name, rs in results.items()}
    steps = cfg["rounds"] * len(cfg["batches"])
    rows = bench.rows_from_times("memory", case, times, torch_providers=("glibc",))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rss = {name: rs[-1]["maxrss_kib"] / 1024 for name, rs in results.items()}
    preloaded = [med[n] for n in PRELOADS if n in med]
    for row in rows:
        name = row.provider
        row.extra = {
            "minor_faults_per_step": sum(r["minflt"] for r in results[name]) / steps,
            "peak_rss_mib": rss[name],
            "rss_vs_glibc": rss[name] / rss["glibc"],
            "speedup_vs_glibc": med["glibc"] / med[name],
            "vs_best_of_jemalloc_tcmalloc": min(preloaded) / med[name] if preloaded else None,
        }
    notes["round_ms"] = {name: [round(t * 1e3, 1) for t in ts] for name, ts in times.items()}
    pool = results["pyeff_pool"][-1]["pool"]
    notes["pyeff_pool_stats"] = {k: v for k, v in pool.items() if k.endswith(".all.peak") or k.startswith("num_")}
    return rows


# ---------------------------------------------------------------- flat buffers


def flat_step_contenders(cfg: dict) -> tuple[dict, int]:
    def with_grads(model):
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        return model

    separate = with_grads(make_model(cfg))
    flattened = with_grads(make_model(cfg))
    flat = pyeff.memory.flatten_parameters(flattened)
    (buf,) = flat.buffers
    one = nn.Parameter(torch.randn(buf.params.numel()))
    one.grad = torch.randn(buf.params.numel())
    numel = buf.params.numel()
    fns = {
        "pyeff_separate": pyeff.optim.AdamW(separate.parameters(), lr=1e-3).step,
        "pyeff_flattened": pyeff.optim.AdamW(flattened.parameters(), lr=1e-3).step,
        "pyeff_one_buffer": pyeff.optim.AdamW([one], lr=1e-3).step,
        bench.CEILING: bench.ceiling_cpu(numel, read_write=3, read_only=1),
    }
    return fns, numel


def flat_buffers(cfg: dict, rounds: int) -> list[bench.Row]:
    fns, numel = flat_step_contenders(cfg)
    n_tensors = len(list(make_model(cfg).parameters()))
    for fn in fns.values():  # state creation and first touch outside the timed rounds
        fn()
    case = f"adamw {n_tensors} tensors {numel / 1e6:.1f}M"
    times = bench.interleaved(fns, rounds, label=f"memory {case}")
    return bench.rows_from_times("flat_buffers", case, times, numel=numel, bytes_per_elem=28,
                                 torch_providers=("pyeff_separate",))


# (layers, width): many small tensors, where the per-tensor cost shows; a model whose step is
# bound by memory bandwidth
FLAT_CASES = {"full": ((24, 64), (12, 256)), "quick": ((24, 64), (4, 128))}


# ---------------------------------------------------------------- report


def extra_table(rows: list[bench.Row]) -> str:
    lines = ["| case | allocator | median step ms | x glibc | x best of jemalloc/tcmalloc | minor faults/step | "
             "peak RSS MiB | RSS / glibc |", "|" + "---|" * 8]
    for r in rows:
        e = r.extra
        best = e["vs_best_of_jemalloc_tcmalloc"]
        lines.append(f"| {r.case} | {r.provider} | {r.ms:.0f} | {e['speedup_vs_glibc']:.2f} | "
                     f"{'' if best is None else f'{best:.2f}'} | {e['minor_faults_per_step']:.0f} | "
                     f"{e['peak_rss_mib']:.0f} | {e['rss_vs_glibc']:.2f} |")
    return "\n".join(lines)


def run(quick: bool = False, out_dir: Path | None = None) -> list[bench.Row]:
    cfg = QUICK if quick else FULL
    notes = {"config": cfg, "targets": "pyeff_pool: >= 1.3x glibc, >= the better of jemalloc/tcmalloc, peak RSS "
                                       "<= 1.2x glibc",
             "vs_best_torch": "the ratio column is relative to glibc (training loop) and to pyeff_separate "
                              "(flat buffers)"}
    case = f"{cfg['layers']}x block d{cfg['d']} T{cfg['seq']} B{min(cfg['batches'])}-{max(cfg['batches'])}"
    loop_rows = training_loop(cfg, case, notes)
    rows = list(loop_rows)
    for layers, d in FLAT_CASES["quick" if quick else "full"]:
        rows += flat_buffers(dict(cfg, layers=layers, d=d), rounds=5 if quick else 15)
    table = extra_table(loop_rows)
    notes["training_loop"] = table
    out = bench.save("memory", rows, out_dir, notes=notes)
    with open(out / "memory.md", "a") as f:
        f.write("\n" + table + "\n")
    print(table)
    for name, why in notes.get("skipped", {}).items():
        print(f"note: {name} skipped: {why}")
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], json.loads(sys.argv[4]))
    else:
        bench.cli(run)
