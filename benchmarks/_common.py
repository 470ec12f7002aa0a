"""What every benchmark suite shares: the bandwidth ceiling, interleaved timing, and reports.

Method (DESIGN.md, Benchmarks):
- the ceiling is measured in the same run with the simplest in-place loop that reads and writes
  the arrays the op does (torch.ops.pyeff.stream_inplace_cpu on the CPU); a STREAM copy would
  undercount in-place updates (write-allocate);
- contenders are timed in interleaved rounds (A B C A B C ...), so machine drift hits all alike;
  each case reports the median and the spread (min-max) over rounds;
- every row gives ms, bytes moved per element, GB/s, % of the ceiling, and the ratio to the best
  PyTorch alternative measured in the same run; rows are saved as JSON and markdown (plus a PNG
  when matplotlib is installed).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pyeff.cli import cpu_name

OUT_DIR = Path(__file__).resolve().parent / "out"


# ---------------------------------------------------------------- machine


def machine() -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import pyeff._ext as ext

        info["cpu_isa"] = ext.cpu_isa()
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------- timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, device="cpu", warmup: int = 1,
                label: str | None = None) -> dict[str, list[float]]:
    """Seconds per call of each contender, timed in interleaved rounds after `warmup` untimed ones.
    Each round starts one contender later than the one before, so that none always runs in the same
    place (first after the previous round's last, say). With a `label`, a progress bar counts the calls."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    progress = Progress((warmup + rounds) * len(contenders), label) if label is not None else None
    order = list(contenders.items())
    for r in range(warmup + rounds):
        k = r % len(order)
        for name, fn in order[k:] + order[:k]:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
            if progress is not None:
                progress.tick()
    return times


CEILING = "ceiling"


def ceiling_cpu(numel: int, read_write: int, read_only: int) -> Callable[[], None]:
    """The in-place loop that reads `read_write + read_only` fp32 arrays of `numel` elements and
    writes `read_write` of them; time it among the contenders under the name CEILING."""
    rw = [torch.randn(numel) for _ in range(read_write)]
    ro = [torch.randn(numel) for _ in range(read_only)]
    return lambda: torch.ops.pyeff.stream_inplace_cpu(rw, ro)


class SharedBuffers:
    """The tensors of a problem as views into one flat buffer per role (parameter, gradient, each
    state), so that every contender, and the ceiling, streams the same memory. On these machines
    where an array lies was measured to change its streaming speed by up to 2x (arrays allocated
    early in a process were slower), which would otherwise decide the ranking. Each view starts
    64-byte aligned, as a tensor of its own would (torch's allocator aligns to 64 bytes)."""

    ALIGN_BYTES = 64

    def __init__(self, sizes: list[int], roles: dict[str, torch.dtype], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        align = self.ALIGN_BYTES // 2  # elements: enough for 2-byte and 4-byte dtypes alike
        starts, total = [], 0
        for n in sizes:
            starts.append(total)
            total += -(-n // align) * align
        # parameters and gradients normal; state non-negative and small (a second moment must be)
        self.flat = {role: (torch.randn(total, generator=g) if role in ("param", "grad") else
                            torch.rand(total, generator=g) * 1e-2).to(dtype) for role, dtype in roles.items()}
        self.views = {role: [buf[s:s + n] for s, n in zip(starts, sizes)] for role, buf in self.flat.items()}

    def parameters(self, param: str = "param", grad: str = "grad") -> list[torch.nn.Parameter]:
        """Parameters over the `param` views, their .grad the `grad` views (new objects each call)."""
        out = []
        for p, g in zip(self.views[param], self.views[grad]):
            out.append(torch.nn.Parameter(p))
            out[-1].grad = g
        return out

    def share_state(self, opt: torch.optim.Optimizer, params, keys: dict[str, str]) -> None:
        """Point opt.state[p][key] at the views of `keys[key]` (call after a first step created state)."""
        for i, p in enumerate(params):
            for key, role in keys.items():
                opt.state[p][key] = self.views[role][i]


# ---------------------------------------------------------------- reporting


@dataclass
class Row:
    suite: str
    case: str
    provider: str
    ms: float
    ms_min: float
    ms_max: float
    bytes_per_elem: float | None = None
    numel: int | None = None
    gbps: float | None = None
    pct_ceiling: float | None = None
    vs_best_torch: float | None = None  # best torch time / this time (>1: faster than torch)
    extra: dict = field(default_factory=dict)


def rows_from_times(suite: str, case: str, times: dict[str, list[float]], *, numel: int | None = None,
                    bytes_per_elem: float | dict[str, float] | None = None,
                    torch_providers: tuple[str, ...] = ()) -> list[Row]:
    """One row per contender. `bytes_per_elem` is one figure for all or one per contender. A
    contender named CEILING is the bandwidth ceiling for the case: it moves the same bytes, and
    every row's % ceiling is its time relative to the ceiling's: the ratio of the medians, and in
    the notes `paired_pct_ceiling`, the median of the ratios within each interleaved round, which
    a drift of the machine's speed over the run (other tenants) moves less."""
    med = {k: statistics.median(v) for k, v in times.items()}
    best_torch = min((med[k] for k in torch_providers if k in med), default=None)
    rows = []
    for name, ts in times.items():
        nbytes = bytes_per_elem.get(name) if isinstance(bytes_per_elem, dict) else bytes_per_elem
        row = Row(suite, case, name, med[name] * 1e3, min(ts) * 1e3, max(ts) * 1e3, nbytes, numel)
        if numel and nbytes:
            row.gbps = numel * nbytes / med[name] / 1e9
            if CEILING in med:
                row.pct_ceiling = 100 * med[CEILING] / med[name]
                if name != CEILING:
                    row.extra["paired_pct_ceiling"] = statistics.median(
                        100 * c / t for c, t in zip(times[CEILING], ts))
        if best_torch is not None and name != CEILING:
            row.vs_best_torch = best_torch / med[name]
        rows.append(row)
    return rows


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _notes(extra: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())


def markdown(rows: list[Row]) -> str:
    head = "| suite | case | provider | median ms | spread ms | B/elem | GB/s | % ceiling | vs best torch | notes |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r.suite} | {r.case} | {r.provider} | {r.ms:.2f} | {r.ms_min:.2f}-{r.ms_max:.2f} | "
                     f"{_fmt(r.bytes_per_elem, '.0f')} | {_fmt(r.gbps, '.1f')} | {_fmt(r.pct_ceiling, '.0f')} | "
                     f"{_fmt(r.vs_best_torch, '.2f')}{'x' if r.vs_best_torch else ''} | {_notes(r.extra)} |")
    return "\n".join(lines)


def save(name: str, rows: list[Row], out_dir: Path | None = None, notes: dict | None = None) -> Path:
    """Write <name>.json, <name>.md (and <name>.png) under out_dir; print the table."""
    out_dir = Path(out_dir or OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), **(notes or {})}
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    table = markdown(rows)
    m = meta["machine"]
    header = (f"{name}: {m['date']}, {m['cpu']} ({m['cores']} cores, {m['threads']} threads, isa "
              f"{m.get('cpu_isa')}), gpu {m['gpu']}, torch {m['torch']}, load {m['load_avg']}")
    (out_dir / f"{name}.md").write_text(header + "\n\n" + table + "\n")
    print(header)
    print(table)
    _plot(name, rows, out_dir)
    return out_dir


def _plot(name: str, rows: list[Row], out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = list(dict.fromkeys(r.case for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(cases) * max(1, len(providers)) / 3), 4))
    width = 0.8 / max(1, len(providers))
    for j, prov in enumerate(providers):
        xs, ys, errs = [], [], []
        for i, case in enumerate(cases):
            for r in rows:
                if r.case == case and r.provider == prov:
                    xs.append(i + j * width)
                    ys.append(r.ms)
                    errs.append([[r.ms - r.ms_min], [r.ms_max - r.ms]])
        if xs:
            lo = [e[0][0] for e in errs]
            hi = [e[1][0] for e in errs]
            ax.bar(xs, ys, width, yerr=[lo, hi], label=prov, capsize=2)
    ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("ms (median, min-max)")
    ax.set_title(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, label: str):
        self.total, self.done, self.label = max(1, total), 0, label
        self._draw()

    def tick(self, n: int = 1) -> None:
        if self.done == self.total:
            return
        self.done = min(self.total, self.done + n)
        self._draw()
        if self.done == self.total:
            sys.stderr.write("\n")

    def _draw(self) -> None:
        filled = int(30 * self.done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
        sys.stderr.flush()


# ---------------------------------------------------------------- problems


def model_like_sizes(total: int = 30_000_000, count: int = 200, seed: int = 0) -> list[int]:
    """Parameter sizes shaped like a transformer's: per layer a few large matrices and several small
    norm/bias vectors, plus an embedding; `count` tensors totalling about `total` elements, none a
    multiple of the vector width."""
    import random

    rng = random.Random(seed)
    layers = count // 8
    hidden = int((total / (layers * 12 + 30 / 7)) ** 0.5) | 1  # odd, not a multiple of any block
    sizes = [30 * hidden * hidden // 7 | 1]  # embedding
    for _ in range(layers):
        sizes += [3 * hidden * hidden, hidden * hidden, 4 * hidden * hidden, 4 * hidden * hidden]  # qkv, out, up, down
        sizes += [hidden, hidden, 4 * hidden, hidden]  # norms and biases
    while len(sizes) < count:
        sizes.append(rng.randrange(1, 4 * hidden))
    return sizes[:count]


def ensure_passive_wait() -> None:
    """Re-exec with OMP_WAIT_POLICY=PASSIVE unless the caller chose a policy: spinning OpenMP threads
    on a shared 2-core machine slow down 2-50x whenever anything else runs (measured)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def cli(run: Callable[[bool, Path | None], list[Row]]) -> None:
    """`python benchmarks/<suite>.py [--quick] [--out DIR]`."""
    import argparse

    ensure_passive_wait()
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {OUT_DIR})")
    args = parser.parse_args()
    run(args.quick, args.out)
