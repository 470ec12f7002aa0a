"""Helpers of the distributed tests: spawn gloo processes on the CPU, and the one-process reference."""

import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        # Let DDP's reducer and FSDP's state (which hold the group) go, and every rank finish its
        # collectives, before the group is destroyed. (Once, in a full suite run, a rank aborted at
        # teardown with "terminate called without an active exception"; the cause was not pinned
        # down, and this order is the safe one.)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world, out_dir) -> list:
    """fn(rank) in `world` processes joined in a gloo group; returns what each rank returned. `fn`
    must be a module-level function (the processes import it)."""
    mp.spawn(_entry, args=(world, free_port(), str(out_dir), fn), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def one_process_on_the_whole_batch(model, opt, per_rank_batches, loss_fn=torch.nn.functional.mse_loss):
    """What data-parallel ranks that average their gradients compute: one process, each step on the
    concatenation of every rank's batch."""
    for step in zip(*per_rank_batches):
        x, y = (torch.cat(parts) for parts in zip(*step))
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]
