"""examples/train.py with every pyeff part against `--stock`: the whole training run, not one op.

Each round runs both modes one after the other under `torchrun --standalone --nproc_per_node=2`
(gloo; torchrun gives each process one thread), from the same seed and command; the order
alternates between rounds so that machine drift hits both. Reported per mode: median over rounds
of the median step time (evaluation excluded), tokens/s, the peak resident memory during training
(max over ranks; also its growth over the resident memory at the first step) and the final
validation loss; per round the paired ratio pyeff / stock, and the machine's load average before
each run. The loss curves of the first round go to a PNG.

    python benchmarks/train_example.py [--quick]     (also: pyeff bench train_example)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import _common as bench

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "train.py"
FULL = {"rounds": 3, "args": []}  # train.py's defaults
QUICK = {"rounds": 1, "args": ["--steps", "20", "--warmup", "4", "--eval-every", "10", "--layers", "2",
                               "--d-model", "96", "--eval-batches", "4"]}
MODES = ("pyeff", "stock")


def run_once(mode: str, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN),
           *args, "--no-progress", "--out", str(out)] + (["--stock"] if mode == "stock" else [])
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py ({mode}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**summary, "load_avg_before": load, "metrics": metrics,
            "command": "torchrun --standalone --nproc_per_node=2 examples/train.py " + " ".join(
                [*args, "--stock"] if mode == "stock" else args)}


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.4g} [{min(xs):.4g}, {max(xs):.4g}]"


def summarize(runs: dict[str, list[dict]]) -> tuple[dict, str]:
    keys = ("tokens_per_s", "step_time_median_s", "peak_rss_mib_max_over_ranks", "peak_rss_growth_mib_max_over_ranks",
            "val_loss")
    per_mode = {m: {k: [r[k] for r in runs[m]] for k in keys} for m in MODES}
    ratios = {
        "tokens_per_s": [p["tokens_per_s"] / s["tokens_per_s"] for p, s in zip(runs["pyeff"], runs["stock"])],
        "peak_rss": [p["peak_rss_mib_max_over_ranks"] / s["peak_rss_mib_max_over_ranks"]
                     for p, s in zip(runs["pyeff"], runs["stock"])],
        "peak_rss_growth": [p["peak_rss_growth_mib_max_over_ranks"] / s["peak_rss_growth_mib_max_over_ranks"]
                            for p, s in zip(runs["pyeff"], runs["stock"])],
    }
    lines = ["| mode | tokens/s | step time (s) | peak RSS (MiB) | peak RSS growth (MiB) | final val loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m in MODES:
        v = per_mode[m]
        lines.append(f"| {m} | " + " | ".join(_spread(v[k]) for k in keys) + " |")
    lines.append("")
    lines.append(f"pyeff / stock per round (median [min, max]): tokens/s {_spread(ratios['tokens_per_s'])}; "
                 f"peak RSS {_spread(ratios['peak_rss'])}; peak RSS growth {_spread(ratios['peak_rss_growth'])}")
    lines.append("load average before each run: " + ", ".join(
        f"{m}{i}: {r['load_avg_before']:.2f}" for i in range(len(runs["pyeff"])) for m in MODES
        for r in [runs[m][i]]))
    return {"per_mode": per_mode, "ratios": ratios}, "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m, color in zip(MODES, ("tab:red", "tab:blue")):
        rows = runs[m][0]["metrics"]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        ax.plot(*zip(*train), color=color, alpha=0.6, label=f"{m}: train loss")
        ax.plot(*zip(*val), "o-", color=color, label=f"{m}: validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("examples/train.py, 2 processes (gloo), same seed")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, out_dir: Path | None = None) -> list:
    cfg = QUICK if quick else FULL
    out = (out_dir or bench.OUT_DIR) / "train_example"
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for i in range(cfg["rounds"]):
        for mode in MODES if i % 2 == 0 else reversed(MODES):
            print(f"round {i + 1}/{cfg['rounds']}: {mode}", flush=True)
            runs[mode].append(run_once(mode, cfg["args"], out / f"{mode}-{i}"))
    stats, table = summarize(runs)
    plot(runs, out / "train_example.png")
    record = {"machine": bench.machine(), "config": cfg, "commands": {m: runs[m][0]["command"] for m in MODES},
              **stats, "runs": {m: [{k: v for k, v in r.items() if k != "metrics"} for r in runs[m]] for m in MODES}}
    (out / "train_example.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "train_example.md").write_text(table + "\n")
    print(table)
    print(f"results: {out}")
    return []


if __name__ == "__main__":
    bench.cli(run)
