"""pyeff's optimizers and scaler inside DistributedDataParallel (gloo, 2 processes on the CPU)."""

import torch
from _gloo import spawn

import pyeff

STEPS = 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 2))


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 2, generator=g)) for _ in range(STEPS)]


def _train(model, opt, scaler, batches):
    for x, y in batches:
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()


def _worker(rank):
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = pyeff.optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.3, amsgrad=True)
    scaler = pyeff.amp.GradScaler("cpu", init_scale=2.0**8)
    _train(model, opt, scaler, _data(rank))
    return [p.detach() for p in model.module.parameters()]


def test_ddp_matches_single_process_on_the_whole_batch(tmp_path):
    world = 2
    ranks = spawn(_worker, world, tmp_path)
    for a, b in zip(*ranks):
        assert torch.equal(a, b)  # every rank holds the same parameters
    # DDP averages gradients over ranks: a single process on the concatenated batch sees the same.
    model = _model()
    opt = pyeff.optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.3, amsgrad=True)
    scaler = pyeff.amp.GradScaler("cpu", init_scale=2.0**8)
    per_rank = [_data(r) for r in range(world)]
    merged = [tuple(torch.cat(parts) for parts in zip(*(batches[i] for batches in per_rank))) for i in range(STEPS)]
    _train(model, opt, scaler, merged)
    for a, b in zip(model.parameters(), ranks[0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
