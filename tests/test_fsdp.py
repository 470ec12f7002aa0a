"""pyeff optimizers on FSDP2 (fully_shard, DTensor parameters) with gloo, 2 processes on the CPU:
they step the local shards, and fused clipping and the overflow skip use the global statistics."""

import pytest
import torch
from _gloo import one_process_on_the_whole_batch, spawn

import pyeff

WORLD = 2
STEPS = 4
CLIP = 0.5
HYPER = dict(lr=1e-2, eps=1e-5)  # see tests/test_comm_hook.py


def _model():
    torch.manual_seed(0)
    # 301 rows: not divisible by the world size, so the shards are uneven.
    return torch.nn.Sequential(torch.nn.Linear(20, 301), torch.nn.Tanh(), torch.nn.Linear(301, 7))


def _batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(6, 20, generator=g), torch.randn(6, 7, generator=g)) for _ in range(STEPS)]


def _fsdp_run(rank, use_pyeff, poison=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if use_pyeff:
        opt = pyeff.optim.AdamW(model.parameters(), max_grad_norm=CLIP, **HYPER)
    else:
        opt = torch.optim.AdamW(model.parameters(), **HYPER)
    norms, skipped = [], []
    for i, (x, y) in enumerate(_batches(rank)):
        if poison is not None and i == poison and rank == 1:
            x = x.clone()
            x[0, 0] = float("inf")
        # FSDP2 averages gradients over the ranks, as DDP does.
        torch.nn.functional.mse_loss(model(x), y).backward()
        if use_pyeff:
            opt.step()
            norms.append(opt.grad_norm.clone())
            skipped.append(bool(opt.last_step_skipped))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).full_tensor())
            opt.step()
        opt.zero_grad()
    params = [p.full_tensor().detach().clone() for p in model.parameters()]
    local = [p.to_local().detach().clone() for p in model.parameters()]
    state = opt.state_dict()["state"][0]
    return {"params": params, "local": local, "norms": norms, "skipped": skipped,
            "state_is_dtensor": type(state["exp_avg"]).__name__ == "DTensor"}


def _worker(rank):
    return {"pyeff": _fsdp_run(rank, True), "torch": _fsdp_run(rank, False), "poison": _fsdp_run(rank, True, poison=1)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_worker, WORLD, tmp_path_factory.mktemp("fsdp"))


def test_pyeff_steps_fsdp2_shards_like_torch_adamw_with_clip_grad_norm(ranks):
    for r in ranks:
        assert r["pyeff"]["state_is_dtensor"]  # the state keeps FSDP2's layout
        for a, b in zip(r["pyeff"]["params"], r["torch"]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_clipping_uses_the_global_norm(ranks):
    for r in ranks:
        for a, b in zip(r["pyeff"]["norms"], r["torch"]["norms"]):
            torch.testing.assert_close(a, b, rtol=5e-6, atol=0)
    assert ranks[0]["pyeff"]["norms"] == ranks[1]["pyeff"]["norms"]


def test_shards_are_not_replicas(ranks):
    # Each rank stepped only its shard: the local tensors differ between the ranks.
    a, b = (r["pyeff"]["local"][0] for r in ranks)
    assert a.shape[0] + b.shape[0] == 301 and not torch.equal(a[: b.shape[0]], b)


def test_matches_one_process_on_the_whole_batch(ranks):
    model = _model()
    opt = pyeff.optim.AdamW(model.parameters(), max_grad_norm=CLIP, **HYPER)
    expected = one_process_on_the_whole_batch(model, opt, [_batches(r) for r in range(WORLD)])
    for a, b in zip(expected, ranks[0]["pyeff"]["params"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_overflow_on_one_rank_skips_the_step_on_both(ranks):
    for r in ranks:
        assert r["poison"]["skipped"] == [False, True, False, False]
