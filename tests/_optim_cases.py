"""Inputs and comparisons shared by the tests of the optimizer kernels' backends (the CUDA kernels
through their CPU emulation, the Triton kernels through the interpreter) against the CPU kernels."""

from __future__ import annotations

import torch

from pyeff.ops import quantize_state

CHUNK = 512  # elements per chunk in these tests (65536 on a GPU): small tensors already take several

# Sizes around the chunk and the vector width (4), 23 tensors: several launches of a small table.
SIZES = [1, 3, 4, 5, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 17, 2, 1000, 64, 7, 9, 33, 130, 1, 6, 31, 511, 8,
         2 * CHUNK, 77]
ADAM_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "master_params",
              "compensations", "exp_avg_absmaxes", "exp_avg_sq_absmaxes", "max_exp_avg_sq_absmaxes", "rng_seeds")
ADAM_COMBOS = [(torch.float32, torch.float32, "plain"), (torch.float64, torch.float64, "plain"),
               (torch.bfloat16, torch.bfloat16, "plain"), (torch.float16, torch.float16, "plain"),
               (torch.bfloat16, torch.float32, "master"), (torch.float16, torch.bfloat16, "master"),
               (torch.bfloat16, torch.bfloat16, "kahan"), (torch.float16, torch.float32, "kahan"),
               (torch.float32, torch.bfloat16, "plain")]


def adam_inputs(sizes, dtype, grad_dtype, mode, amsgrad, offset=0, state=None, sr=False):
    """Random state (never zeros); with `offset`, every tensor is a view starting `offset` elements
    into its storage, so that no 16-byte vector access is aligned. `state`: the moments' format
    (None: the parameters' dtype, fp32 next to master weights; a dtype; "int8" codes with their
    absmax); `sr`: a seed per tensor for stochastic rounding."""
    def make(n, dt, fn=torch.randn, scale=1.0):
        return (fn(n + offset) * scale).to(dt)[offset:]

    fp32_state = torch.float32 if mode == "master" or state == "int8" else dtype
    master = [make(n, torch.float32) for n in sizes] if mode == "master" else []
    x = dict(
        params=[make(n, dtype) for n in sizes],
        grads=[make(n, grad_dtype) for n in sizes],
        exp_avgs=[make(n, fp32_state, scale=0.1) for n in sizes],
        exp_avg_sqs=[make(n, fp32_state, torch.rand, 0.01) for n in sizes],
        max_exp_avg_sqs=[make(n, fp32_state, torch.rand, 0.02) for n in sizes] if amsgrad else [],
        state_steps=[torch.tensor(float(k % 7)) for k in range(len(sizes))],
        master_params=master,
        compensations=[make(n, dtype, scale=1e-3) for n in sizes] if mode == "kahan" else [],
        exp_avg_absmaxes=[], exp_avg_sq_absmaxes=[], max_exp_avg_sq_absmaxes=[],
        rng_seeds=[1000003 * k + 7 for k in range(len(sizes))] if sr else [],
    )
    compress(x, {"exp_avgs": True, "exp_avg_sqs": False, "max_exp_avg_sqs": False}, state, offset)
    return x


def compress(x, moments, state, offset=0):
    """Moments (list name -> signed) in format `state`: a dtype, or "int8" codes (views `offset`
    elements into their storage, as the other tensors) with their absmax lists."""
    if state is None:
        return
    for name, signed in moments.items():
        if state != "int8":
            x[name] = [t.to(state) for t in x[name]]
            continue
        codes, absmaxes = [], []
        for t in x[name]:
            c, a = quantize_state(t.float(), "int8" if signed else "uint8")
            codes.append(torch.empty(c.numel() + offset, dtype=c.dtype).as_strided(c.shape, c.stride(), offset).copy_(c))
            absmaxes.append(a)
        x[name] = codes
        x[name[:-1] + "_absmaxes"] = absmaxes if codes else []


ADAM_HP = [dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
                decoupled_weight_decay=True),
           dict(lr=0.003, beta1=0.5, beta2=0.999, eps=1e-6, weight_decay=0.02, amsgrad=False, maximize=True,
                decoupled_weight_decay=False)]


def clone(inputs):
    return {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] for k, v in inputs.items()}


def assert_equal(got, want, what):
    for key in want:
        for i, (a, b) in enumerate(zip(got[key], want[key])):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}, {key}[{i}]: {m}")


ADAGRAD_LISTS = ("params", "grads", "state_sums", "state_steps", "master_params", "compensations",
                 "state_sum_absmaxes", "rng_seeds")
ADAGRAD_HP = dict(lr=0.05, lr_decay=0.3, weight_decay=0.0, eps=1e-6, maximize=True)



def adagrad_inputs(dtype, mode, sparse_rows=(), state=None, sr=False):
    sizes = SIZES[:12]
    fp32_or_own = torch.float32 if mode == "master" else dtype
    params = [torch.randn(n).to(dtype) for n in sizes]
    grads = [torch.randn(n).to(dtype) for n in sizes]
    for i, rows in enumerate(sparse_rows):  # parameters with sparse gradients, 2-D and 3-D
        shape = (40, 3, 5) if i % 2 else (60, 7)
        params.append(torch.randn(shape).to(dtype))
        sparse_dim = 2 if i % 2 else 1
        idx = torch.stack([torch.randint(0, shape[d], (rows,)) for d in range(sparse_dim)])
        grads.append(torch.sparse_coo_tensor(idx, torch.randn(rows, *shape[sparse_dim:]).to(dtype), shape))
    x = dict(
        params=params, grads=grads,
        state_sums=[(torch.rand(p.shape) + 0.01).to(torch.float32 if state == "int8" else fp32_or_own) for p in params],
        state_steps=[torch.tensor(float(k % 5)) for k in range(len(params))],
        master_params=[p.float() + 1e-3 * torch.randn(p.shape) for p in params] if mode == "master" else [],
        compensations=[(1e-3 * torch.randn(p.shape)).to(dtype) for p in params] if mode == "kahan" else [],
        state_sum_absmaxes=[], rng_seeds=[7919 * k + 3 for k in range(len(params))] if sr else [],
    )
    compress(x, {"state_sums": False}, state)
    return x


SGD_LISTS = ("params", "grads", "momentum_buffers", "is_first_step", "master_params", "compensations")
SGD_HP = [dict(lr=0.01, momentum=0.9, dampening=0.2, weight_decay=0.1, nesterov=False, maximize=True),
          dict(lr=0.003, momentum=0.5, dampening=0.0, weight_decay=0.02, nesterov=True, maximize=False),
          dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)]


def sgd_inputs(sizes, dtype, grad_dtype, mode, momentum, offset=0):
    """As adam_inputs; every third tensor takes its first momentum step, its buffer NaN (an output
    only: a kernel that reads it, or does not write it, fails)."""
    x = adam_inputs(sizes, dtype, grad_dtype, mode, False, offset)
    first = [k % 3 == 0 for k in range(len(sizes))] if momentum else []
    bufs = [m.clone() for m in x["exp_avgs"]] if momentum else []
    for b, f in zip(bufs, first):
        if f:
            b.fill_(float("nan"))
    return dict(params=x["params"], grads=x["grads"], momentum_buffers=bufs, is_first_step=first,
                master_params=x["master_params"], compensations=x["compensations"])


def grads_of_every_dtype():
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    return [torch.randn(n).to(dtypes[i % 4]) * 3 for i, n in enumerate(SIZES)]


