"""The pyeff optimizers under test beside their torch.optim twins (OPTIMIZERS, for the tests every
optimizer shares: test_optimizers.py, test_amp.py), and the helpers that drive such a pair."""

from __future__ import annotations

import copy

import torch

import pyeff


class Optim:
    """One optimizer under test: its torch and pyeff classes; arguments that exercise its state
    (`kwargs`); a learning rate whose updates bf16 parameters round away (`small_lr`); arguments
    that train the test model (`train`); the state it keeps per parameter beside 'step'
    (`state_keys`); configurations for checkpoint round trips (`checkpoints`); and its own ways to
    break a step (`bad_steps`: name, corrupt(params, opt), error, regex)."""

    def __init__(self, torch_cls, pyeff_cls, kwargs, small_lr, train, state_keys, checkpoints, bad_steps=()):
        self.torch_cls, self.pyeff_cls, self.kwargs = torch_cls, pyeff_cls, kwargs
        self.small_lr, self.train, self.state_keys = small_lr, train, state_keys
        self.checkpoints, self.bad_steps = checkpoints, list(bad_steps)

    def torch(self, params, **extra):
        return self.torch_cls(params, **{**self.kwargs, **extra})

    def pyeff(self, params, **extra):
        return self.pyeff_cls(params, **{**self.kwargs, **extra})


def _group(key, value):
    def corrupt(params, opt):
        opt.param_groups[-1][key] = value  # groups can be edited after construction
    return corrupt


def _sparse_grad(params, opt):
    params[-1].grad = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.randn(2, *params[-1].shape[1:]),
                                              params[-1].shape)


OPTIMIZERS = {
    "adamw": Optim(torch.optim.AdamW, pyeff.optim.AdamW, dict(lr=1e-2, amsgrad=True), small_lr=1e-4,
                   train=dict(lr=3e-3), state_keys=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                   checkpoints=[dict(lr=0.02, weight_decay=0.1, amsgrad=True)],
                   bad_steps=[("beta2 >= 1", _group("betas", (0.9, 1.5)), ValueError,
                               "Invalid beta parameter at index 1: 1.5")]),
    "adagrad": Optim(torch.optim.Adagrad, pyeff.optim.Adagrad, dict(lr=1e-2, lr_decay=0.01), small_lr=1e-3,
                     train=dict(lr=0.05), state_keys=("sum",),
                     checkpoints=[dict(lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1)],
                     bad_steps=[("eps edited", _group("eps", -1.0), ValueError, "Invalid epsilon value: -1.0")]),
    "sgd": Optim(torch.optim.SGD, pyeff.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
                 small_lr=1e-4, train=dict(lr=0.05, momentum=0.9), state_keys=("momentum_buffer",),
                 checkpoints=[dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
                              dict(lr=torch.tensor(0.05), momentum=0.8, dampening=0.2, maximize=True), dict(lr=0.1)],
                 bad_steps=[("sparse grad", _sparse_grad, RuntimeError, "sparse gradients are not supported by the"),
                            ("dampening with nesterov", _group("dampening", 0.5), ValueError,
                             "Nesterov momentum requires a momentum and zero dampening")]),
}

SHAPES = [(5, 3), (7,), (1,), (2, 3, 4), (33,)]
# A pyeff optimizer vs its torch twin after several steps: torch's fused multiply-adds (add_ with
# alpha, addcmul_) may round once where pyeff rounds each operation.
PARITY = {torch.float32: dict(rtol=2e-5, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-14)}


def make_params(dtype, shapes=SHAPES, seed=0, complex_too=False):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    if complex_too:
        ps.append(torch.randn(4, 3, generator=gen, dtype=dtype).to(torch.complex64 if dtype == torch.float32
                                                                   else torch.complex128))
    return ps


def pair(torch_cls, pyeff_cls, params, torch_kwargs, pyeff_kwargs=None):
    """Twin parameters and a torch and a pyeff optimizer over them."""
    a = [torch.nn.Parameter(p.clone()) for p in params]
    b = [torch.nn.Parameter(p.clone()) for p in params]
    kw_b = copy.deepcopy(torch_kwargs if pyeff_kwargs is None else pyeff_kwargs)
    return a, b, torch_cls(a, **copy.deepcopy(torch_kwargs)), pyeff_cls(b, **kw_b)


def set_grads(seed, *param_lists):
    """The same fresh random gradients on every list of parameters."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in param_lists[0]]
    for ps in param_lists:
        for p, g in zip(ps, grads):
            p.grad = g.clone()


def train(params, opt, steps, seed):
    for step in range(steps):
        set_grads(seed + step, params)
        opt.step()


def assert_optimizers_match(a, b, opt_a, opt_b, dtype):
    """Parameters close; the same state layout (keys, dtypes) with values close."""
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(y.detach(), x.detach(), **PARITY[dtype], msg=lambda m, i=i: f"param {i}: {m}")
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), (k, sa[k].keys(), sb[k].keys())
        for key in sa[k]:
            assert sa[k][key].dtype == sb[k][key].dtype, (k, key)
            torch.testing.assert_close(sb[k][key], sa[k][key], **PARITY[dtype], msg=lambda m, k=k: f"{k}: {m}")
