"""Train a small GPT-style byte-level language model on the Python standard library's own source,
with every pyeff part, under torchrun (DDP: gloo on the CPU, NCCL on GPUs). `--stock` swaps each
pyeff part for stock torch, so the two runs compare from the same command and seed:

    torchrun --standalone --nproc_per_node=2 examples/train.py            # or: pyeff train ...
    torchrun --standalone --nproc_per_node=2 examples/train.py --stock

| part | pyeff (default) | --stock |
| --- | --- | --- |
| parameters | bf16 (fp16 with --precision fp16), fp32 masters in the optimizer | fp32 |
| optimizer | pyeff.optim.AdamW(master_weights=True, max_grad_norm=) | torch AdamW(fused=True) + clip_grad_norm_ |
| overflow / norm pass | pyeff.distributed comm hook, during the all-reduce | clip_grad_norm_ (and GradScaler's pass) |
| loss scaling (fp16) | pyeff.amp.GradScaler | torch.amp.GradScaler |
| layers | pyeff.nn.patch(): fused LayerNorm (+ residual add), Linear+GELU | torch.nn |
| LM head + loss | pyeff.nn.functional.linear_cross_entropy | cross_entropy(linear(...)) |
| CPU memory | pyeff.memory pool | glibc malloc |

Both run under autocast (bf16 by default). The LR warms up linearly, then follows a cosine; it
advances only on steps that were applied (a step skipped for an inf/NaN gradient leaves it).
Checkpoints (`--ckpt-every`, and always at the end or at `--stop-at`) hold the model, optimizer,
scaler, scheduler, the step (which fixes the data position, see lm_data.py) and every rank's RNG
state; `--resume` continues a run bitwise as if it had not stopped. Written to `--out`:
`metrics.jsonl` (one line per log interval and evaluation), `summary.json`, TensorBoard events in
`tb/` (when tensorboard is installed), `ckpt/`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import re
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyeff  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from lm_data import load_corpus, train_batch, val_batches  # noqa: E402


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stock", action="store_true", help="stock torch instead of every pyeff part")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/train-pyeff or -stock)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (the schedule's length)")
    p.add_argument("--stop-at", type=int, default=None, help="checkpoint and stop after this step (resume later)")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=2e-4, help="learning rate at the end of the cosine")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: 10%% of --steps, <= 30)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="autocast dtype (fp16 adds a GradScaler)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", type=Path, default=None, help="folder of .py files (default: the stdlib)")
    p.add_argument("--corpus-bytes", type=int, default=None, help="cap on the training text")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches (split over the ranks)")
    p.add_argument("--ckpt-every", type=int, default=0, help="0: only at the end / --stop-at")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-hook", action="store_true", help="pyeff without its DDP comm hook")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a line per log interval)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps after warm-up")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "layers", "d_model", "heads", "eval_batches", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"train.py: Invalid --{name.replace('_', '-')}: {getattr(args, name)} (must be >= 1)")
    if args.stop_at is not None and not 0 < args.stop_at <= args.steps:
        raise SystemExit(f"train.py: Invalid --stop-at {args.stop_at}: must be in 1..--steps ({args.steps})")
    if args.warmup is None:
        args.warmup = min(30, args.steps // 10)
    if not 0 <= args.warmup < args.steps:
        raise SystemExit(f"train.py: Invalid --warmup {args.warmup}: must be in 0..--steps - 1")
    args.out = args.out or Path("runs") / ("train-stock" if args.stock else "train-pyeff")
    return args


# -- distributed set-up ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(args) -> tuple[int, int, torch.device]:
    """Rank, world size and device; a single process without torchrun is a world of one."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.py: --device cuda, but torch sees no GPU")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# -- memory ------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")


def memory_mib(device: torch.device) -> dict:
    out = {"rss_mib": _status_kib("VmRSS") / 1024, "peak_rss_mib": _status_kib("VmHWM") / 1024}
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    elif pyeff.memory.is_enabled():
        s = pyeff.memory.stats()
        out["pool_peak_allocated_mib"] = s["allocated_bytes.all.peak"] / 2**20
        out["pool_peak_reserved_mib"] = s["reserved_bytes.all.peak"] / 2**20
    return out


# -- model, optimizer, schedule ------------------------------------------------------------------

def lr_factor(step: int, args) -> float:
    """Warm-up + cosine, as a multiple of --lr; `step` counts applied updates."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    floor = args.min_lr / args.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build(args, device: torch.device, world: int):
    cfg = GPTConfig(seq_len=args.seq_len, layers=args.layers, d_model=args.d_model, heads=args.heads,
                    dropout=args.dropout)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in both modes
    model = GPT(cfg, fused_head=not args.stock)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    if not args.stock:
        pyeff.nn.patch(model)
        if low is not None:
            model.to(low)  # the optimizer keeps the fp32 masters
    model.to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if args.stock:
        opt = torch.optim.AdamW(groups, fused=True, **kw)
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    else:
        opt = pyeff.optim.AdamW(groups, master_weights=low is not None, max_grad_norm=args.clip, **kw)
        scaler = pyeff.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        if world > 1 and not args.no_hook:
            pyeff.distributed.register_grad_stats_hook(ddp, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args))
    return model, ddp, opt, scaler, sched


def train_step(args, ddp, model, opt, scaler, sched, x, y, autocast) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step: (loss, grad norm, skipped)."""
    with autocast:
        loss = ddp(x, y)
    scaler.scale(loss).backward()
    if args.stock:
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        if scaler.is_enabled():
            scaler.step(opt)
            scaler.update()
            skipped = scaler.get_scale() < scale
        else:
            skipped = not torch.isfinite(norm)  # stepping would write NaN into every parameter
            if not skipped:
                opt.step()
    else:  # unscaling, overflow skip and clipping happen inside the step
        scaler.step(opt)
        scaler.update()
        norm, skipped = opt.grad_norm, bool(opt.last_step_skipped)
    if not skipped:  # the LR follows applied updates only
        sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), norm, skipped


@torch.no_grad()
def evaluate(model, val, args, rank, world, device, autocast) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(val_batches(val, args.eval_batches, args.batch_size, args.seq_len)):
        if i % world == rank:
            with autocast:
                total += torch.stack([model(x.to(device), y.to(device)).double(), torch.ones((), device=device)])
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# -- checkpoints -------------------------------------------------------------------------------

def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(args, step, model, opt, scaler, sched, rank, world, device) -> None:
    ckpt = args.out / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # DDP keeps every rank's model and optimizer identical
        state = {"step": step, "world": world, "config": model.cfg.as_dict(), "stock": args.stock,
                 "precision": args.precision, "seed": args.seed, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "scheduler": sched.state_dict()}
        torch.save(state, ckpt / "state.pt.tmp")
        os.replace(ckpt / "state.pt.tmp", ckpt / "state.pt")
    torch.save({"step": step, **_rng_state(device)}, ckpt / f"rng-rank{rank}.pt.tmp")
    os.replace(ckpt / f"rng-rank{rank}.pt.tmp", ckpt / f"rng-rank{rank}.pt")
    dist.barrier()


def load_checkpoint(args, model, opt, scaler, sched, rank, world, device) -> int:
    ckpt = args.out / "ckpt"
    if not (ckpt / "state.pt").exists():
        raise SystemExit(f"train.py: --resume, but there is no checkpoint at {ckpt / 'state.pt'}")
    state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
    mismatch = {k: (state[k], v) for k, v in (("config", model.cfg.as_dict()), ("stock", args.stock),
                                              ("precision", args.precision), ("seed", args.seed)) if state[k] != v}
    if mismatch:
        raise SystemExit("train.py: the checkpoint was written by another set-up: "
                         + "; ".join(f"{k}: checkpoint {a}, now {b}" for k, (a, b) in mismatch.items()))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    sched.load_state_dict(state["scheduler"])
    rng_file = ckpt / f"rng-rank{rank}.pt"
    if state["world"] == world and rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        if rng["step"] != state["step"]:
            raise SystemExit(f"train.py: {rng_file} is from step {rng['step']}, state.pt from {state['step']}")
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    elif rank == 0:
        print(f"train.py: checkpoint from {state['world']} processes, now {world}: random state not restored "
              "(the run continues, but not bitwise)", file=sys.stderr)
    return state["step"]


# -- logging -----------------------------------------------------------------------------------

class Logger:
    """metrics.jsonl always; TensorBoard when installed; a progress bar (tqdm, when installed)."""

    def __init__(self, args, rank, start, total):
        self.rank, self.file, self.tb, self.bar = rank, None, None, None
        if rank != 0:
            return
        args.out.mkdir(parents=True, exist_ok=True)
        self.file = open(args.out / "metrics.jsonl", "a" if args.resume else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(args.out / "tb"), purge_step=start if args.resume else None)
        except ImportError as e:
            print(f"train.py: no TensorBoard logging ({e}); metrics go to {args.out / 'metrics.jsonl'}")
        if not args.no_progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc="pyeff" if not args.stock else "stock",
                                unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def log(self, step: int, record: dict) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            if "loss" in record:
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
            if "val_loss" in record:
                self.bar.write(f"step {step}: val_loss {record['val_loss']:.4f}")
        elif "loss" in record:
            print(f"step {step}: loss {record['loss']:.4f} lr {record['lr']:.2e} grad_norm {record['grad_norm']:.3f} "
                  f"tokens/s {record['tokens_per_s']:.0f}", flush=True)
        elif "val_loss" in record:
            print(f"step {step}: val_loss {record['val_loss']:.4f}", flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        for h in (self.bar, self.tb, self.file):
            if h is not None:
                h.close()


# -- the run -----------------------------------------------------------------------------------

def main(argv=None, prog=None) -> dict:
    args = parse_args(argv, prog)
    rank, world, device = init_distributed(args)
    try:
        summary = run(args, rank, world, device)
        gc.collect()  # DDP's reducer holds the group: let it go, and every rank finish, before it is destroyed
        dist.barrier()
        return summary
    finally:
        dist.destroy_process_group()
        if pyeff.memory.is_enabled():
            pyeff.memory.disable()


def run(args, rank, world, device) -> dict:
    if device.type == "cpu" and not args.stock:
        pyeff.memory.enable()
    train, val = load_corpus(args.corpus, args.corpus_bytes)
    model, ddp, opt, scaler, sched = build(args, device, world)
    start = load_checkpoint(args, model, opt, scaler, sched, rank, world, device) if args.resume else 0
    stop = args.stop_at or args.steps
    if start >= stop:
        raise SystemExit(f"train.py: the checkpoint is at step {start}; nothing left to do up to {stop}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    tokens_per_step = world * args.batch_size * args.seq_len
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"train.py: {'stock torch' if args.stock else 'pyeff'}, {world} process(es) on {device.type} "
              f"({dist.get_backend()}), {torch.get_num_threads()} thread(s) each; {n_params / 1e6:.2f}M parameters; "
              f"corpus {len(train) / 1e6:.1f} MB train / {len(val) / 1e6:.1f} MB val; {tokens_per_step} tokens/step; "
              f"steps {start}..{stop} of {args.steps}", flush=True)

    logger = Logger(args, rank, start, stop)
    reset_peak_rss()
    rss_at_start = memory_mib(device)["rss_mib"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times, interval = [], {"loss": torch.zeros((), dtype=torch.float64, device=device), "n": 0, "t": 0.0,
                                "skipped": 0}
    profiler = None
    val_loss = None
    for step in range(start, stop):
        if args.profile and step == start + 5:
            profiler = torch.profiler.profile(record_shapes=False)
            profiler.__enter__()
        x, y = (t.to(device, non_blocking=True) for t in train_batch(train, step, args.seed, rank, world,
                                                                       args.batch_size, args.seq_len))
        t0 = time.perf_counter()
        loss, norm, skipped = train_step(args, ddp, model, opt, scaler, sched, x, y, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        interval["loss"] += loss
        interval["n"] += 1
        interval["t"] += dt
        interval["skipped"] += int(skipped)
        logger.advance()
        if profiler is not None and step == start + 5 + args.profile - 1:
            profiler.__exit__(None, None, None)
            if rank == 0:
                (args.out / "profile.txt").write_text(
                    profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=-1))
            profiler = None
        done = step + 1
        if done % args.log_every == 0 or done == stop:
            mean_loss = interval["loss"] / interval["n"]
            dist.all_reduce(mean_loss)
            logger.log(done, {"loss": mean_loss.item() / world, "lr": sched.get_last_lr()[0],
                              "grad_norm": float(norm), "skipped_steps": interval["skipped"],
                              "step_time_s": interval["t"] / interval["n"],
                              "tokens_per_s": tokens_per_step * interval["n"] / interval["t"], **memory_mib(device)})
            interval.update(loss=torch.zeros_like(interval["loss"]), n=0, t=0.0, skipped=0)
        if done % args.eval_every == 0 or done == args.steps:
            val_loss = evaluate(model, val, args, rank, world, device, autocast)
            logger.log(done, {"val_loss": val_loss})
        if (args.ckpt_every and done % args.ckpt_every == 0) or done == stop:
            save_checkpoint(args, done, model, opt, scaler, sched, rank, world, device)
    logger.close()
    return summarize(args, rank, world, device, step_times, tokens_per_step, val_loss, n_params, stop, rss_at_start)


def summarize(args, rank, world, device, step_times, tokens_per_step, val_loss, n_params, stop, rss_at_start) -> dict:
    steady = step_times[5:] or step_times  # the first steps pay one-time costs (allocations, DDP buckets)
    mem = memory_mib(device)
    # Peak resident memory during training (VmHWM, reset at the start) and its growth over the
    # resident memory at the start (libraries, corpus, model, optimizer state before step 1).
    peak = torch.tensor([mem["peak_rss_mib"], mem["peak_rss_mib"] - rss_at_start], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    median = statistics.median(steady)
    summary = {
        "mode": "stock" if args.stock else "pyeff", "world": world, "device": device.type,
        "threads_per_process": torch.get_num_threads(), "parameters": n_params, "steps_run": len(step_times),
        "last_step": stop, "tokens_per_step": tokens_per_step, "step_time_median_s": median,
        "step_time_p10_s": statistics.quantiles(steady, n=10)[0] if len(steady) >= 2 else median,
        "step_time_p90_s": statistics.quantiles(steady, n=10)[-1] if len(steady) >= 2 else median,
        "tokens_per_s": tokens_per_step / median, "val_loss": val_loss,
        "peak_rss_mib_max_over_ranks": peak[0].item(), "peak_rss_growth_mib_max_over_ranks": peak[1].item(),
        **{f"rank0_{k}": v for k, v in mem.items()},
    }
    if rank == 0:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        val = f"val loss {val_loss:.4f}, " if val_loss is not None else ""
        print(f"train.py: done, {summary['steps_run']} steps: {val}{summary['tokens_per_s']:.0f} tokens/s (median step "
              f"{median:.3f} s), peak RSS {peak[0]:.0f} MiB (+{peak[1]:.0f} MiB during training); "
              f"details in {args.out / 'summary.json'}", flush=True)
    return summary


if __name__ == "__main__":
    main()
