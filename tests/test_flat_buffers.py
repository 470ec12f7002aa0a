"""pyeff.memory.flatten_parameters: parameters and gradients as consecutive views of one buffer per
(device, dtype), with the model, its state_dict and the optimizers unchanged, also under DDP."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import pyeff
import pyeff.memory as mem


def make_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 33),
                          nn.LayerNorm(33), nn.Linear(33, 7))
    return model.to(dtype)


def batch(step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 3, 7, 7, generator=g).to(dtype)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_parameters_become_consecutive_views_of_one_buffer():
    model = make_model()
    model[0].weight.data = model[0].weight.data.to(memory_format=torch.channels_last)  # strides kept
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strides = [p.stride() for p in model.parameters()]
    ids = [id(p) for p in model.parameters()]
    x = batch(0)
    out = model(x)
    flat = mem.flatten_parameters(model)
    (buf,) = flat.buffers
    params = list(model.parameters())
    assert [id(p) for p in params] == ids and [p.stride() for p in params] == strides
    assert buf.params.numel() == sum(p.numel() for p in params) and buf.params.is_contiguous()
    for p, off in zip(params, buf.offsets):
        assert p.untyped_storage().data_ptr() == buf.params.untyped_storage().data_ptr()
        assert p.storage_offset() == off and isinstance(p, nn.Parameter) and p.requires_grad
    span = mem.flat_view(params)
    assert span is not None and span.data_ptr() == buf.params.data_ptr() and span.numel() == buf.params.numel()
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]) and after[k].shape == before[k].shape
    assert torch.equal(model(x), out)


def test_flat_view_refuses_what_is_not_one_span():
    buf = torch.randn(100)
    a, b, c = buf[:10], buf[10:30].view(4, 5), buf[30:31]
    assert torch.equal(mem.flat_view([a, b, c]), buf[:31])
    assert mem.flat_view([a, c]) is None  # a gap
    assert mem.flat_view([b, a]) is None  # out of order
    assert mem.flat_view([a, torch.randn(20)]) is None  # another storage
    assert mem.flat_view([buf[::2]]) is None  # not dense
    assert mem.flat_view([]) is None


def test_flat_zeros_like_lays_state_out_like_the_parameters():
    model = make_model()
    model[0].weight.data = model[0].weight.data.to(memory_format=torch.channels_last)
    flat = mem.flatten_parameters(model)
    params = list(model.parameters())
    buf, views = mem.flat_zeros_like(params, dtype=torch.float64)
    assert buf.dtype == torch.float64 and buf.numel() == flat.buffers[0].params.numel() and not buf.any()
    assert [v.shape for v in views] == [p.shape for p in params]
    assert [v.stride() for v in views] == [p.stride() for p in params]
    assert mem.flat_view(views).data_ptr() == buf.data_ptr()
    with pytest.raises(ValueError, match="Invalid tensors: each must be dense"):
        mem.flat_zeros_like([torch.randn(4, 4)[:, ::2]])
    with pytest.raises(ValueError, match="Invalid tensors: an empty list"):
        mem.flat_zeros_like([])


@pytest.mark.parametrize("zero_grad", ["set_to_none", "keep", "flat", "accumulate"])
@pytest.mark.parametrize("opt_name", ["pyeff", "torch"])
def test_training_is_unchanged(zero_grad, opt_name):
    # Same model, same batches: flattened or not, the parameters match bit for bit, and once
    # backward has run every gradient is a view of the gradient buffer (NOTE [flat gradients]).
    def train(flatten: bool):
        model = make_model()
        flat = mem.flatten_parameters(model) if flatten else None
        cls = pyeff.optim.AdamW if opt_name == "pyeff" else torch.optim.AdamW
        opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(4):
            for micro in range(2 if zero_grad == "accumulate" else 1):
                model(batch(2 * step + micro)).square().mean().backward()
            if flat is not None:
                grads = [p.grad for p in model.parameters()]
                span = mem.flat_view(grads)
                assert span is not None and span.data_ptr() == flat.buffers[0].grads.data_ptr()
            opt.step()
            if zero_grad == "flat" and flat is not None:
                flat.zero_grad()
            else:
                opt.zero_grad(set_to_none=zero_grad != "keep")
        return model, opt

    plain, plain_opt = train(False)
    flat, flat_opt = train(True)
    for a, b in zip(plain.parameters(), flat.parameters()):
        assert torch.equal(a, b)
    sa, sb = plain_opt.state_dict(), flat_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])


def test_a_parameter_without_gradient_is_skipped_as_before():
    def train(flatten: bool):
        model = make_model()
        if flatten:
            mem.flatten_parameters(model)
        opt = pyeff.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(3):
            h = model[:5](batch(step))  # the last Linear gets no gradient
            h.square().mean().backward()
            assert model[5].weight.grad is None
            opt.step()
            opt.zero_grad()
        return snapshot(model)

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)


def test_checkpoints_move_between_flat_and_plain_models(tmp_path):
    flat_model = make_model()
    mem.flatten_parameters(flat_model)
    opt = pyeff.optim.AdamW(flat_model.parameters(), lr=1e-2)
    flat_model(batch(0)).sum().backward()
    opt.step()
    torch.save({"model": flat_model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt")
    plain = make_model(seed=1)
    plain.load_state_dict(ckpt["model"])
    for a, b in zip(plain.parameters(), flat_model.parameters()):
        assert torch.equal(a, b)
    # Loading into a flattened model writes into the buffer: the parameters stay views.
    other = make_model(seed=2)
    flat = mem.flatten_parameters(other)
    other.load_state_dict(plain.state_dict())
    assert mem.flat_view(list(other.parameters())) is not None
    assert torch.equal(flat.buffers[0].params, torch.cat([p.detach().reshape(-1) for p in plain.parameters()]))


def test_groups_by_dtype_and_requires_grad_and_shared_parameters_once():
    model = make_model()
    model[3].to(torch.float64)
    model[4].weight.requires_grad_(False)
    params = list(model.parameters()) + [model[5].weight]  # a parameter given twice
    model[5].weight.grad = torch.randn_like(model[5].weight)
    grad_before = model[5].weight.grad.clone()
    flat = mem.flatten_parameters(params)
    kinds = [(b.params.dtype, b.grads is not None) for b in flat.buffers]
    assert kinds == [(torch.float32, True), (torch.float64, True), (torch.float32, False)]
    assert sum(len(b.members) for b in flat.buffers) == len(list(model.parameters()))
    assert torch.equal(model[5].weight.grad, grad_before)  # an existing gradient moves into the buffer
    index = [id(p) for p in flat.buffers[0].members].index(id(model[5].weight))
    assert model[5].weight.grad.data_ptr() == flat.buffers[0].grad_view(index).data_ptr()


def test_flattening_twice_and_removing_hooks():
    model = make_model()
    mem.flatten_parameters(model)
    flat = mem.flatten_parameters(model)  # replaces the first buffer and its hooks
    model(batch(0)).sum().backward()
    assert mem.flat_view([p.grad for p in model.parameters()]).data_ptr() == flat.buffers[0].grads.data_ptr()
    flat.remove_hooks()
    for p in model.parameters():
        p.grad = None
    model(batch(1)).sum().backward()
    assert mem.flat_view([p.grad for p in model.parameters()]) is None  # autograd's own tensors now
    assert mem.flat_view(list(model.parameters())) is not None


def test_low_precision_and_deepcopy():
    model = make_model(dtype=torch.bfloat16)
    flat = mem.flatten_parameters(model)
    assert flat.buffers[0].params.dtype == torch.bfloat16
    twin = copy.deepcopy(model)  # nn.Parameter copies each parameter: a plain model, equal values
    assert mem.flat_view(list(twin.parameters())) is None
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    twin(batch(0, torch.bfloat16)).float().sum().backward()
    assert all(p.grad is not None for p in twin.parameters())


BAD_INPUTS = [
    (lambda: [torch.randn(3, requires_grad=True) * 2], ValueError, "Invalid parameter: a non-leaf tensor"),
    (lambda: ["weight"], ValueError, "Invalid parameter: expected a Tensor, got str"),
]


@pytest.mark.parametrize("make,error,message", BAD_INPUTS)
def test_bad_inputs(make, error, message):
    with pytest.raises(error, match=message):
        mem.flatten_parameters(make())


def test_expanded_parameters_are_left_as_they_are():
    odd = nn.Parameter(torch.randn(1, 4).expand(3, 4))
    fine = nn.Parameter(torch.randn(5))
    flat = mem.flatten_parameters([odd, fine])
    assert flat.skipped == [odd] and flat.buffers[0].members == [fine]


DDP_SCRIPT = textwrap.dedent("""
    import os
    import torch, torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    import pyeff, pyeff.memory as mem

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def train(flatten):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 4))
        flat = mem.flatten_parameters(model) if flatten else None
        ddp = DDP(model)
        opt = pyeff.optim.AdamW(ddp.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for step in range(4):
            ddp(torch.randn(8, 16, generator=g)).square().mean().backward()
            if flat is not None:
                span = mem.flat_view([p.grad for p in model.parameters()])
                assert span is not None and span.data_ptr() == flat.buffers[0].grads.data_ptr()
            opt.step()
            opt.zero_grad()
        if flat is not None:
            assert mem.flat_view(list(model.parameters())).data_ptr() == flat.buffers[0].params.data_ptr()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    plain, flat = train(False), train(True)
    assert torch.equal(plain, flat), (plain - flat).abs().max()
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])  # the ranks agree
    print(f"rank {rank} ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13's gloo now and then aborts at interpreter exit ("terminate called without an
    # active exception", with or without pyeff): leave without running destructors.
    os._exit(0)
""")


def test_ddp_two_processes(tmp_path):
    script = tmp_path / "ddp_flat.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout
