"""pyeff.distributed's grad-stats comm hook, and ZeroRedundancyOptimizer over pyeff optimizers, in
DDP with gloo (2 processes on the CPU). One spawn runs every scenario; the tests read its results."""

import pytest
import torch
from _gloo import one_process_on_the_whole_batch, spawn

import pyeff
import pyeff.distributed

WORLD = 2
STEPS = 4
CLIP = 0.5
# A larger eps than the default keeps Adam from turning the rounding of near-zero gradient entries
# (sums in another order across ranks) into visible update differences.
HYPER = dict(lr=1e-2, eps=1e-5)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 300), torch.nn.Tanh(), torch.nn.Linear(300, 400), torch.nn.Tanh(),
                               torch.nn.Linear(400, 3))


def _batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(6, 20, generator=g), torch.randn(6, 3, generator=g)) for _ in range(STEPS)]


def _ddp(model):
    # Small buckets: the statistics are summed over several of them.
    return torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.2)


def _run(rank, hook=None, poison=None, touch=None, compress=None, dtype=torch.float32):
    """STEPS steps of DDP + pyeff AdamW(max_grad_norm); per step: the optimizer's norm, the norm of
    the gradients it stepped (get_total_norm), whether the hook's statistics were used, skipped."""
    model = _model().to(dtype)
    ddp = _ddp(model)
    opt = pyeff.optim.AdamW(model.parameters(), max_grad_norm=CLIP, master_weights=True, **HYPER)
    used = []
    if hook:
        pyeff.distributed.register_grad_stats_hook(ddp, opt, compress=compress)
        provider = opt.grad_stats_provider
        opt.grad_stats_provider = lambda grads: used.append(provider(grads)) or used[-1]
    log = []
    for i, (x, y) in enumerate(_batches(rank)):
        if poison is not None and i == poison and rank == 1:
            x = x.clone()
            x[0, 0] = float("inf")
        torch.nn.functional.mse_loss(ddp(x.to(dtype)), y.to(dtype)).backward()
        if touch is not None and i == touch:
            next(model.parameters()).grad.mul_(0.5)  # changed after the hook saw it
        ref = torch.nn.utils.get_total_norm([p.grad.float() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        log.append({"norm": opt.grad_norm.clone(), "ref": ref, "skipped": bool(opt.last_step_skipped),
                    "used": bool(used and used[-1] is not None) if hook else False})
    return [p.detach().clone() for p in model.parameters()], log


def _run_zero(rank, pyeff_opt):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = _model()
    ddp = _ddp(model)
    if pyeff_opt:
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=pyeff.optim.AdamW, max_grad_norm=CLIP,
                                       **HYPER)
        pyeff.distributed.register_grad_stats_hook(ddp, zero)
    else:
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **HYPER)
    for x, y in _batches(rank):
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        if not pyeff_opt:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        zero.step()
        zero.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank):
    return {
        "hook": _run(rank, hook=True),
        "plain": _run(rank, hook=False),
        "fp16": _run(rank, hook=True, compress=torch.float16),
        "bf16": _run(rank, hook=True, compress=torch.bfloat16),
        "poison": _run(rank, hook=True, poison=1),
        "touch": _run(rank, hook=True, touch=2),
        "bf16_params": _run(rank, hook=True, dtype=torch.bfloat16),  # bf16 buckets, fp32 masters
        "zero_pyeff": _run_zero(rank, True),
        "zero_torch": _run_zero(rank, False),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_worker, WORLD, tmp_path_factory.mktemp("comm_hook"))


SCENARIOS = ["hook", "plain", "fp16", "bf16", "poison", "touch", "bf16_params"]


@pytest.mark.parametrize("name", SCENARIOS + ["zero_pyeff", "zero_torch"])
def test_ranks_hold_identical_parameters(ranks, name):
    a, b = (r[name][0] if isinstance(r[name], tuple) else r[name] for r in ranks)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["hook", "fp16", "bf16", "poison", "bf16_params"])
def test_optimizer_takes_the_hooks_statistics(ranks, name):
    for r in ranks:
        assert all(step["used"] for step in r[name][1])


@pytest.mark.parametrize("name", ["hook", "plain", "fp16", "bf16", "touch", "bf16_params"])
def test_norm_is_clip_grad_norms(ranks, name):
    # The norm of exactly the gradients stepped (after the compressed all-reduce, where compressed).
    for r in ranks:
        for step in r[name][1]:
            torch.testing.assert_close(step["norm"], step["ref"], rtol=5e-6, atol=0)  # fp32 sums, two orders


def test_step_with_hook_equals_step_without(ranks):
    for r in ranks:
        for a, b in zip(r["hook"][0], r["plain"][0]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for h, p in zip(r["hook"][1], r["plain"][1]):
            torch.testing.assert_close(h["norm"], p["norm"], rtol=1e-6, atol=0)


def test_hook_matches_one_process_on_the_whole_batch(ranks):
    model = _model()
    opt = pyeff.optim.AdamW(model.parameters(), max_grad_norm=CLIP, **HYPER)
    expected = one_process_on_the_whole_batch(model, opt, [_batches(r) for r in range(WORLD)])
    for a, b in zip(expected, ranks[0]["hook"][0]):
        # Adam turns gradient rounding on near-zero entries into update differences: 1e-3 of a step.
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_compressed_allreduce_gives_the_uncompressed_norm_to_its_precision(ranks, name):
    tol = {"fp16": 1e-3, "bf16": 8e-3}[name]  # first step: the same parameters, gradients rounded
    torch.testing.assert_close(ranks[0][name][1][0]["norm"], ranks[0]["plain"][1][0]["norm"], rtol=tol, atol=0)


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(ranks):
    for r in ranks:
        assert [s["skipped"] for s in r["poison"][1]] == [False, True, False, False]
        assert not torch.isfinite(r["poison"][1][1]["norm"])


def test_gradients_changed_after_the_hook_get_their_own_pass(ranks):
    for r in ranks:
        assert [s["used"] for s in r["touch"][1]] == [True, True, False, True]


def test_zero_with_pyeff_adamw_matches_zero_with_torch_adamw(ranks):
    # ZeRO shards the optimizer; the hook's norm is the whole model's, as clip_grad_norm_ on it.
    for r in ranks:
        for a, b in zip(r["zero_pyeff"], r["zero_torch"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_register_rejects_what_it_cannot_serve():
    model = _model()
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        pyeff.distributed.register_grad_stats_hook(model, pyeff.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="Invalid compress"):
        pyeff.distributed.GradStatsState(compress=torch.float64)
