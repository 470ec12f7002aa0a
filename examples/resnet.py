"""Image classification as people start it: ResNet-18 (random init) under DDP, mixed precision
written as torch does it today (`torch.autocast` + a GradScaler), and a fused pyeff optimizer.
The images are generated, so nothing is downloaded: each class is a fixed random smooth pattern,
and every sample is its class pattern, randomly shifted, plus noise; a model that learns shows it
in the held-out accuracy.

    torchrun --standalone --nproc_per_node=2 examples/resnet.py                  # bf16 autocast
    torchrun --standalone --nproc_per_node=1 examples/resnet.py --precision fp16  # on a GPU
    python examples/resnet.py --optimizer adagrad --stock                          # torch.optim instead

On the CPU the autocast dtype is bf16 (no scaler needed); with fp16 the GradScaler is on
(`pyeff.amp.GradScaler`: the optimizer's own pass finds overflows; torch.amp.GradScaler with
--stock). Clipping (`--clip`) is fused into the pyeff step, its norm taken during the all-reduce
by pyeff.distributed's comm hook.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyeff  # noqa: E402
from resnet18 import resnet18  # noqa: E402
from train import free_port  # noqa: E402

OPTIMIZERS = {"adamw": ("AdamW", dict(lr=1e-3, weight_decay=0.05)), "adam": ("Adam", dict(lr=1e-3)),
              "adagrad": ("Adagrad", dict(lr=0.01))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    p.add_argument("--stock", action="store_true", help="torch.optim and torch.amp.GradScaler instead of pyeff's")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="images per rank and step")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--clip", type=float, default=None, help="max global gradient norm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.image_size, args.classes) < 1:
        raise SystemExit("resnet.py: --steps, --batch-size, --image-size and --classes must be >= 1")
    if args.image_size < 32:
        raise SystemExit(f"resnet.py: Invalid --image-size {args.image_size}: ResNet-18 needs at least 32")
    return args


class GeneratedImages:
    """Class c's pattern: 3 x 8 x 8 Gaussian noise (seeded by c) upsampled to the image size. A
    sample: its pattern rolled by a random shift, plus unit noise, normalised."""

    def __init__(self, classes: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.patterns = F.interpolate(torch.randn(classes, 3, 8, 8, generator=g), size=(size, size), mode="bilinear",
                                      align_corners=False)
        self.classes, self.size, self.seed = classes, size, seed

    def batch(self, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + index)
        labels = torch.randint(0, self.classes, (n,), generator=g)
        shifts = torch.randint(-4, 5, (n, 2), generator=g)
        x = torch.stack([self.patterns[c].roll(tuple(s.tolist()), dims=(1, 2)) for c, s in zip(labels, shifts)])
        x = x + torch.randn(x.shape, generator=g)
        return (x - x.mean()) / x.std(), labels


def main(argv=None) -> dict:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train(args, dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def train(args, rank: int, world: int, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    model, source = resnet18(args.classes)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    name, hyper = OPTIMIZERS[args.optimizer]
    if args.stock:
        opt = getattr(torch.optim, name)(model.parameters(), **hyper)
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    else:
        opt = getattr(pyeff.optim, name)(model.parameters(), max_grad_norm=args.clip, **hyper)
        scaler = pyeff.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        if world > 1 and args.clip is not None:
            pyeff.distributed.register_grad_stats_hook(ddp, opt)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    data = GeneratedImages(args.classes, args.image_size, args.seed)
    if rank == 0:
        print(f"resnet.py: ResNet-18 from {source}; {'torch.optim' if args.stock else 'pyeff.optim'}.{name}, "
              f"{args.precision}, {world} process(es) on {device}", flush=True)

    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = data.batch(step * world + rank, args.batch_size)
        x, y = x.to(device, memory_format=memory_format), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(ddp(x), y)
        scaler.scale(loss).backward()
        if args.stock and args.clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f}", flush=True)
    elapsed = time.perf_counter() - t0

    model.eval()
    correct = torch.zeros(2, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for i in range(4):  # held-out images: indices the training never drew
            x, y = data.batch(10**9 + i * world + rank, args.batch_size)
            pred = model(x.to(device, memory_format=memory_format)).argmax(1)
            correct += torch.stack([(pred == y.to(device)).sum(), torch.tensor(len(y), device=device)]).float()
    dist.all_reduce(correct)
    result = {"accuracy": (correct[0] / correct[1]).item(), "final_loss": loss.item(),
              "images_per_s": args.steps * args.batch_size * world / elapsed}
    if rank == 0:
        print(f"resnet.py: held-out accuracy {result['accuracy']:.3f} (chance {1 / args.classes:.3f}), "
              f"{result['images_per_s']:.1f} images/s", flush=True)
    return result


if __name__ == "__main__":
    main()
