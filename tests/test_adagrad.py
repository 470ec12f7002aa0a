"""pyeff.optim.Adagrad and the adagrad_step op.

- op level: every backend against the reference on random inputs (dense and sparse gradients, all
  dtypes and low-precision modes, sizes that are no multiple of any vector width), a hypothesis
  property test, and a table of bad inputs that must raise before anything is written;
- optimizer level: torch's errors and eager state, sparse gradients with repeated indices, master
  weights in checkpoints, the mixed-precision step (both GradScalers, overflow skip, max_grad_norm,
  master weights). What every optimizer shares with its torch twin (optim_db parity and error
  inputs, checkpoints both ways, bad steps) is tested in test_optimizers.py.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from _optimizers import assert_optimizers_match, make_params, pair, set_grads, train

import pyeff
from pyeff.ops import OPS
from pyeff.ops.adagrad import ADAGRAD, adagrad_step

BACKENDS = [b for b in OPS["adagrad_step"].backends() if b != "reference" and
            pyeff.ops.backend_usable(b, torch.device("cpu")) is None]
# Sizes that are no multiple of any vector width or block (16/32/64 elements).
SIZES = (1, 3, 31, 33, 100, 1000, 4099)
# Backend vs reference: the math is the same; torch's sqrt on the CPU (used by the reference) is not
# always correctly rounded, so 1-ulp differences in std, and 1 ulp of the stored dtype.
TOL = {
    torch.float32: dict(rtol=2e-6, atol=5e-7),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}

warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def _close(actual, expected, dtype, what="", tol=None):
    torch.testing.assert_close(actual, expected, **(tol or TOL)[dtype], msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------- op


def _op_inputs(dtype, sizes, mode="plain", seed=0, steps=None):
    """params, grads, state_sums, state_steps, master_params, compensations: random, never zeros."""
    g = torch.Generator().manual_seed(seed)
    sum_dtype = torch.float32 if mode == "master" else dtype
    params = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    sums = [(torch.rand(n, generator=g) + 0.01).to(sum_dtype) for n in sizes]
    state_steps = [torch.tensor(float(k if steps is None else steps)) for k in range(len(sizes))]
    masters = [p.float() + 1e-3 * torch.randn(p.shape, generator=g) for p in params] if mode == "master" else []
    comps = [(1e-3 * torch.randn(p.shape, generator=g)).to(dtype) for p in params] if mode == "kahan" else []
    return [params, grads, sums, state_steps, masters, comps]


def _clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


def _assert_lists_close(actual, expected, dtype, names=("params", "grads", "state_sums", "state_steps",
                                                        "master_params", "compensations")):
    if actual[5]:
        # Compensated summation: a 1-ulp difference in the fp32 update may round the parameter the
        # other way, and its compensation then differs by that ulp too; what the pair represents,
        # parameter + compensation, agrees up to one ulp of the compensation (itself at most half an
        # ulp of the parameter): 2**-16 relative for bf16.
        for i, (p, c, q, d) in enumerate(zip(actual[0], actual[5], expected[0], expected[5])):
            _close(p.float() + c.float(), q.float() + d.float(), torch.float32, f"params+compensations[{i}]",
                   tol={torch.float32: dict(rtol=4e-5, atol=1e-6)})
        actual, expected = actual[:5], expected[:5]
    for name, xs, ys in zip(names, actual, expected):
        for i, (x, y) in enumerate(zip(xs, ys)):
            tol_dtype = torch.float32 if x.dtype == torch.float32 and dtype != torch.float64 else dtype
            _close(x, y, tol_dtype if name != "state_steps" else torch.float64, f"{name}[{i}]")


MODES = [(torch.float32, "plain"), (torch.float64, "plain"), (torch.bfloat16, "plain"),
         (torch.bfloat16, "master"), (torch.bfloat16, "kahan"), (torch.float16, "plain"),
         (torch.float16, "master"), (torch.float16, "kahan")]
HYPER = [
    dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False),
    dict(lr=0.05, lr_decay=0.3, weight_decay=0.1, eps=1e-6, maximize=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,mode", MODES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("hyper", HYPER, ids=["plain-hyper", "decay-wd-maximize"])
@pytest.mark.parametrize("grad_mult", [None, 0.25], ids=["no-mult", "mult"])
def test_dense_backend_matches_reference(backend, dtype, mode, hyper, grad_mult):
    ref = _op_inputs(dtype, SIZES, mode)
    out = _clone(ref)
    mult = None if grad_mult is None else torch.tensor(grad_mult)
    adagrad_step(*ref, **hyper, grad_mult=mult, backend="reference")
    adagrad_step(*out, **hyper, grad_mult=mult, backend=backend)
    _assert_lists_close(out, ref, dtype)
    assert [s.item() for s in out[3]] == [k + 1.0 for k in range(len(SIZES))]


@pytest.mark.parametrize("dtype,grad_dtype,mode", [
    (torch.bfloat16, torch.float32, "master"), (torch.float16, torch.bfloat16, "kahan"),
    (torch.float32, torch.bfloat16, "plain"), (torch.bfloat16, torch.float16, "plain"),
], ids=lambda x: str(x).replace("torch.", ""))
def test_gradients_of_another_low_precision_dtype(dtype, grad_dtype, mode):
    ref = _op_inputs(dtype, SIZES, mode)
    ref[1] = [g.to(grad_dtype) for g in ref[1]]
    out = _clone(ref)
    adagrad_step(*ref, **HYPER[1], backend="reference")
    adagrad_step(*out, **HYPER[1], backend="cpu")
    _assert_lists_close(out, ref, dtype)


def _sparse_grad(shape, sparse_dim, nnz, dtype, gen, repeat=True):
    """A random uncoalesced COO gradient; with `repeat`, some indices appear more than once."""
    idx = torch.stack([torch.randint(0, shape[d], (nnz,), generator=gen) for d in range(sparse_dim)])
    if repeat and nnz > 2:
        idx[:, -2:] = idx[:, :2].clone()
    values = torch.randn((nnz, *shape[sparse_dim:]), generator=gen).to(dtype)
    return torch.sparse_coo_tensor(idx, values, shape)


SPARSE_SHAPES = [((50, 7), 1, 9), ((30, 67), 1, 40), ((6, 5, 3), 2, 11), ((13, 4), 2, 20), ((9,), 1, 5),
                 ((8, 0), 1, 3), ((20, 33), 1, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,mode", MODES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("maximize", [False, True])
def test_sparse_backend_matches_reference(backend, dtype, mode, maximize):
    gen = torch.Generator().manual_seed(1)
    shapes = [s for s, _, _ in SPARSE_SHAPES]
    sum_dtype = torch.float32 if mode == "master" else dtype
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [_sparse_grad(s, sd, nnz, dtype, gen) for s, sd, nnz in SPARSE_SHAPES]
    sums = [(torch.rand(s, generator=gen) + 0.01).to(sum_dtype) for s in shapes]
    masters = [p.float() + 1e-3 * torch.randn(p.shape, generator=gen) for p in params] if mode == "master" else []
    comps = [(1e-3 * torch.randn(p.shape, generator=gen)).to(dtype) for p in params] if mode == "kahan" else []
    ref = [params, grads, sums, [torch.tensor(2.0) for _ in shapes], masters, comps]
    out = _clone(ref)
    before = _clone(ref)
    hyper = dict(lr=0.1, lr_decay=0.2, weight_decay=0.0, eps=1e-8, maximize=maximize)
    adagrad_step(*ref, **hyper, grad_mult=torch.tensor(0.5), backend="reference")
    adagrad_step(*out, **hyper, grad_mult=torch.tensor(0.5), backend=backend)
    _assert_lists_close(out, ref, dtype)
    # Only the touched rows change; every other element keeps its bits.
    for i, g in enumerate(grads):
        touched = torch.zeros(shapes[i][:g.sparse_dim()], dtype=torch.bool)
        touched[tuple(g._indices())] = True
        for k in (0, 2, 4, 5):
            if not out[k]:
                continue
            assert torch.equal(out[k][i][~touched], before[k][i][~touched])
            if g._nnz() and shapes[i][-1] != 0:
                assert not torch.equal(out[k][i][touched], before[k][i][touched]) or k == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dense_and_sparse_in_one_call(backend):
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(40, 9, generator=gen), torch.randn(1001, generator=gen), torch.randn(12, 5, generator=gen)]
    grads = [_sparse_grad((40, 9), 1, 25, torch.float32, gen), torch.randn(1001, generator=gen),
             _sparse_grad((12, 5), 1, 7, torch.float32, gen)]
    sums = [torch.rand(p.shape, generator=gen) for p in params]
    ref = [params, grads, sums, [torch.tensor(0.0) for _ in params], [], []]
    out = _clone(ref)
    for lists, b in ((ref, "reference"), (out, backend)):
        adagrad_step(*lists, lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False, backend=b)
    _assert_lists_close(out, ref, torch.float32)


def test_non_contiguous_tensors_are_updated_in_place():
    # A strided parameter (dense gradient) and a transposed one (sparse gradient): kernels run on
    # dense copies, the results land in the caller's tensors.
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(20, 30, generator=gen)
    p_dense = base[:, ::3]
    p_sparse = torch.randn(9, 11, generator=gen).t()
    grads = [torch.randn(p_dense.shape, generator=gen), _sparse_grad((11, 9), 1, 6, torch.float32, gen)]
    sums = [torch.rand(20, 10, generator=gen), torch.rand(9, 11, generator=gen).t()]
    ref = [[p_dense.clone(), p_sparse.clone()], grads, [s.clone() for s in sums],
           [torch.tensor(0.0), torch.tensor(0.0)], [], []]
    out = [[p_dense, p_sparse], grads, sums, [torch.tensor(0.0), torch.tensor(0.0)], [], []]
    adagrad_step(*ref, lr=0.1, eps=1e-10, backend="reference")
    adagrad_step(*out, lr=0.1, eps=1e-10)
    _assert_lists_close(out, ref, torch.float32)
    assert p_dense.data_ptr() == base.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("sparse", [False, True])
def test_found_inf_skips_everything_bitwise(backend, sparse):
    gen = torch.Generator().manual_seed(4)
    lists = _op_inputs(torch.bfloat16, (5, 77), "master")
    if sparse:
        lists[1] = [_sparse_grad((5,), 1, 3, torch.bfloat16, gen), _sparse_grad((77,), 1, 9, torch.bfloat16, gen)]
    before = _clone(lists)
    adagrad_step(*lists, lr=0.1, grad_mult=torch.tensor(2.0), found_inf=torch.tensor(1.0), backend=backend)
    for xs, ys in zip(lists, before):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y) if not x.is_sparse else torch.equal(x.to_dense(), y.to_dense())


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    dtype_mode=st.sampled_from(MODES),
    n_tensors=st.integers(1, 4),
    lr=st.floats(1e-4, 1.0),
    lr_decay=st.sampled_from([0.0, 1e-3, 0.5]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    eps=st.sampled_from([1e-10, 1e-8, 1e-3]),
    maximize=st.booleans(),
    grad_mult=st.sampled_from([None, 0.5, 3.0]),
    step=st.integers(0, 1000),
)
def test_property_backends_match_reference(data, dtype_mode, n_tensors, lr, lr_decay, weight_decay, eps, maximize,
                                           grad_mult, step):
    dtype, mode = dtype_mode
    sizes = data.draw(st.lists(st.integers(0, 300), min_size=n_tensors, max_size=n_tensors))
    seed = data.draw(st.integers(0, 2**31 - 1))
    ref = _op_inputs(dtype, sizes, mode, seed=seed, steps=step)
    if weight_decay == 0 and data.draw(st.booleans()):  # some gradients sparse
        gen = torch.Generator().manual_seed(seed)
        ref[1] = [_sparse_grad((n,), 1, data.draw(st.integers(0, 2 * n + 1)), dtype, gen) if n else g
                  for n, g in zip(sizes, ref[1])]
    ref_before = _clone(ref)
    hyper = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize,
                 grad_mult=None if grad_mult is None else torch.tensor(grad_mult))
    adagrad_step(*ref, **hyper, backend="reference")
    for backend in BACKENDS:
        out = _clone(ref_before)
        adagrad_step(*out, **hyper, backend=backend)
        _assert_lists_close(out, ref, dtype)


def test_custom_op_passes_opcheck():
    lists = _op_inputs(torch.float32, (3, 40))
    args = (*lists, [], [], 0.1, 0.0, 0.1, 1e-10, False, torch.tensor(0.5), torch.tensor(0.0), None)
    torch.library.opcheck(ADAGRAD.overload("cpu"), args, test_utils=("test_schema", "test_faketensor"))


def test_lower_isa_variants_agree(same_bits_on_every_isa):
    # Every per-ISA build computes the same bits (same operations, no contraction), dense and sparse.
    code = """
import sys, warnings, torch, pyeff
warnings.simplefilter("ignore")
torch.manual_seed(0)
ps = [torch.randn(1003), torch.randn(40, 33)]
gs = [torch.randn(1003), torch.sparse_coo_tensor(torch.tensor([[3, 1, 3, 39]]), torch.randn(4, 33), (40, 33))]
ss = [torch.rand(1003), torch.rand(40, 33)]
torch.ops.pyeff.adagrad_step.cpu(ps, gs, ss, [torch.zeros(()), torch.zeros(())], [], [], [], [], lr=0.1, lr_decay=0.1,
    weight_decay=0.0, eps=1e-10, maximize=True, grad_mult=torch.tensor(0.5))
torch.save(ps + ss, sys.argv[1])
"""
    same_bits_on_every_isa(code)


# ---------------------------------------------------------------------------------- op bad inputs


def _good():
    return _op_inputs(torch.float32, (4, 6))


def _sparse_good():
    lists = _op_inputs(torch.float32, (4, 6))
    lists[0][1] = torch.randn(6, 2)
    lists[2][1] = torch.rand(6, 2)
    lists[1][1] = torch.sparse_coo_tensor(torch.tensor([[0, 5]]), torch.randn(2, 2), (6, 2))
    return lists


def _edit(make, k, i, value):
    def build():
        lists = make()
        lists[k][i] = value(lists[k][i]) if callable(value) else value
        return lists
    return build


BAD_OP_INPUTS = [
    ("grad dtype", _edit(_good, 1, 1, lambda g: g.double()), {}, r"grads\[1\] to be Float, got Double"),
    # (the dispatcher itself refuses a meta tensor in the list, before the kernel's own check)
    ("grad device", _edit(_good, 1, 0, lambda g: g.to("meta")), {}, r"grads\[0\] on cpu, got meta|Meta tensors"),
    ("grad shape", _edit(_good, 1, 1, torch.randn(7)), {}, r"grads\[1\] of shape \[6\]"),
    ("sum dtype", _edit(_good, 2, 0, lambda s: s.half()), {},
     r"state_sums\[0\] to be Float, BFloat16, int8 block codes, got Half"),
    ("sum layout", _edit(_good, 2, 1, torch.rand(12)[::2]), {}, r"state_sums\[1\] to be dense"),
    ("step dtype", _edit(_good, 3, 1, torch.tensor(1)), {}, r"state_steps\[1\] to be float32 or float64"),
    ("step numel", _edit(_good, 3, 0, torch.zeros(2)), {}, r"state_steps\[0\] to have one element"),
    ("int params", lambda: [[torch.ones(3, dtype=torch.int32)], [torch.ones(3, dtype=torch.int32)],
                            [torch.ones(3, dtype=torch.int32)], [torch.zeros(())], [], []], {},
     r"expected floating-point parameters"),
    ("too few sums", lambda: (lambda ls: [ls[0], ls[1], ls[2][:1], ls[3], ls[4], ls[5]])(_good()), {},
     r"expected state_sums to hold 2 tensors"),
    ("master for fp32", lambda: (lambda ls: [*ls[:4], [p.clone() for p in ls[0]], []])(_good()), {},
     r"master weights and compensated summation are for bfloat16/float16"),
    ("master and kahan", lambda: (lambda ls: [*ls[:4], [p.float() for p in ls[0]], [p.clone() for p in ls[0]]])(
        _op_inputs(torch.bfloat16, (4, 6))), {}, r"`master_params` and `compensations` cannot both be given"),
    ("sparse with weight decay", _sparse_good, dict(weight_decay=0.1),
     r"weight_decay option is not compatible with sparse gradients"),
    ("sparse index out of range", _edit(_sparse_good, 1, 1, torch.sparse_coo_tensor(
        torch.tensor([[0, 6]]), torch.randn(2, 2), (6, 2))), {}, r"grads\[1\] has index 6 in dimension 0"),
    ("sparse negative index", _edit(_sparse_good, 1, 1, torch.sparse_coo_tensor(
        torch.tensor([[-1, 2]]), torch.randn(2, 2), (6, 2), check_invariants=False)), {},
     r"grads\[1\] has index -1 in dimension 0"),
    ("sparse dtype", _edit(_sparse_good, 1, 1, lambda g: g.double()), {}, r"grads\[1\] to be Float, got Double"),
    ("sparse shape", _edit(_sparse_good, 1, 1, torch.sparse_coo_tensor(
        torch.tensor([[0, 1]]), torch.randn(2, 3), (6, 3))), {}, r"grads\[1\] of shape \[6, 2\]"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,extra,regex", BAD_OP_INPUTS, ids=[b[0] for b in BAD_OP_INPUTS])
def test_bad_op_inputs_raise_before_writing(backend, name, make, extra, regex):
    lists = make()
    before = _clone(lists)
    kwargs = dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False, grad_mult=None,
                  found_inf=None)
    kwargs.update(extra)
    impl = OPS["adagrad_step"].overload(backend)
    with pytest.raises(RuntimeError, match=regex):
        impl(*lists, [], [], **kwargs)  # no int8 codes, no stochastic rounding
    for xs, ys in zip(lists, before):
        for x, y in zip(xs, ys):
            if x.device.type == "cpu" and not x.is_sparse:
                assert torch.equal(x, y)


# ------------------------------------------------------------------------------------- optimizer

def _pair(params, torch_kwargs, pyeff_kwargs=None):
    return pair(torch.optim.Adagrad, pyeff.optim.Adagrad, params, torch_kwargs, pyeff_kwargs)


CONSTRUCTOR_ERRORS = [
    (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (dict(lr_decay=-0.5), ValueError, "Invalid lr_decay value: -0.5"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (dict(initial_accumulator_value=-1.0), ValueError, "Invalid initial_accumulator_value value: -1.0"),
    (dict(eps=-1e-3), ValueError, "Invalid epsilon value: -0.001"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
    (dict(lr=-1.0, eps=-1.0), ValueError, "Invalid learning rate"),  # torch's order: lr first
    (dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support `differentiable`"),
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together."),
]


@pytest.mark.parametrize("kwargs,error,regex", CONSTRUCTOR_ERRORS, ids=[str(c[0]) for c in CONSTRUCTOR_ERRORS])
def test_constructor_errors_match_torch(kwargs, error, regex):
    for cls in (torch.optim.Adagrad, pyeff.optim.Adagrad):
        with pytest.raises(error, match=regex):
            cls([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_state_is_created_eagerly_like_torch():
    for default_dtype in (torch.float32, torch.float64):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(default_dtype)
        try:
            params = make_params(torch.float32, complex_too=True)
            a, b, opt_a, opt_b = _pair(params, dict(initial_accumulator_value=0.3))
        finally:
            torch.set_default_dtype(prev)
        sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
        assert sd_a["state"].keys() == sd_b["state"].keys() == set(range(len(params)))
        for k, sa in sd_a["state"].items():
            sb = sd_b["state"][k]
            assert sa.keys() == sb.keys() == {"step", "sum"}
            for key in sa:
                assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape
                assert torch.equal(sa[key], sb[key])
        assert set(sd_a["param_groups"][0]) <= set(sd_b["param_groups"][0])


def test_added_param_group_uses_the_defaults_accumulator_value_lazily():
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5))
    p2, q2 = torch.nn.Parameter(p.detach().clone()), torch.nn.Parameter(q.detach().clone())
    opt_a = torch.optim.Adagrad([p], initial_accumulator_value=0.5)
    opt_b = pyeff.optim.Adagrad([p2], initial_accumulator_value=0.5)
    opt_a.add_param_group({"params": [q], "initial_accumulator_value": 2.0, "lr": 0.3})
    opt_b.add_param_group({"params": [q2], "initial_accumulator_value": 2.0, "lr": 0.3})
    assert q2 not in opt_b.state
    for step in range(3):
        set_grads(step, [p, q], [p2, q2])
        try:
            opt_a.step()
        except KeyError:  # torch.optim.Adagrad before lazy state (e.g. 2.11) cannot step an added group
            pytest.skip(f"torch {torch.__version__}'s Adagrad has no state for an added param group")
        opt_b.step()
    assert_optimizers_match([p, q], [p2, q2], opt_a, opt_b, torch.float32)


# ----------------------------------------------------------------------------- sparse gradients


class _Embeddings(torch.nn.Module):
    def __init__(self, dtype=torch.float32, sparse=True):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 12, sparse=sparse, dtype=dtype)
        self.bag = torch.nn.EmbeddingBag(30, 5, mode="sum", sparse=sparse, dtype=dtype)
        self.head = torch.nn.Linear(12, 1, dtype=dtype)

    def forward(self, idx, bag_idx):
        return self.head(self.emb(idx)).sum() + self.bag(bag_idx).square().sum()


def _sparse_batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        idx = torch.randint(0, 50, (3, 7), generator=gen)
        idx[0, :3] = idx[1, :3]  # repeated indices in one batch: coalesce sums them
        batches.append((idx, torch.randint(0, 30, (4, 3), generator=gen)))
    return batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.1, lr_decay=0.2, maximize=True),
                                    dict(lr=0.05, initial_accumulator_value=0.2, eps=1e-6)],
                         ids=["default", "decay-maximize", "init-acc"])
def test_sparse_parity_with_torch(dtype, kwargs):
    torch.manual_seed(0)
    ma = _Embeddings(dtype)
    mb = copy.deepcopy(ma)
    opt_a, opt_b = torch.optim.Adagrad(ma.parameters(), **kwargs), pyeff.optim.Adagrad(mb.parameters(), **kwargs)
    for idx, bag in _sparse_batches(10):
        for m, opt in ((ma, opt_a), (mb, opt_b)):
            opt.zero_grad()
            m(idx, bag).backward()
        assert mb.emb.weight.grad.is_sparse and not mb.emb.weight.grad.is_coalesced()
        opt_a.step()
        opt_b.step()
    assert_optimizers_match(list(ma.parameters()), list(mb.parameters()), opt_a, opt_b, dtype)


def test_sparse_only_touched_rows_change():
    torch.manual_seed(0)
    m = _Embeddings()
    opt = pyeff.optim.Adagrad(m.parameters(), lr=0.1)
    before_w, before_s = m.emb.weight.detach().clone(), opt.state[m.emb.weight]["sum"].clone()
    idx, bag = _sparse_batches(1)[0]
    m(idx, bag).backward()
    opt.step()
    touched = torch.zeros(50, dtype=torch.bool)
    touched[idx.flatten()] = True
    assert torch.equal(m.emb.weight.detach()[~touched], before_w[~touched])
    assert torch.equal(opt.state[m.emb.weight]["sum"][~touched], before_s[~touched])
    assert (m.emb.weight.detach()[touched] != before_w[touched]).all()


def test_sparse_weight_decay_raises_before_any_write():
    # torch raises this from inside its loop, after earlier parameters were updated; pyeff first.
    dense = torch.nn.Parameter(torch.randn(5))
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = pyeff.optim.Adagrad([dense, emb.weight], weight_decay=0.1)
    dense.grad = torch.randn(5)
    emb(torch.tensor([1, 2])).sum().backward()
    snapshot = (dense.detach().clone(), emb.weight.detach().clone(), copy.deepcopy(opt.state_dict()))
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients"):
        opt.step()
    assert torch.equal(dense, snapshot[0]) and torch.equal(emb.weight, snapshot[1])
    assert opt.state[dense]["step"].item() == 0


def test_sparse_out_of_range_index_raises_before_any_write():
    p0, p1 = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(6, 2))
    opt = pyeff.optim.Adagrad([{"params": [p0]}, {"params": [p1]}])
    p0.grad = torch.randn(5)
    p1.grad = torch.sparse_coo_tensor(torch.tensor([[1, 6]]), torch.randn(2, 2), (6, 2))
    before = p0.detach().clone()
    with pytest.raises(RuntimeError, match="index 6 in dimension 0"):
        opt.step()
    assert torch.equal(p0, before) and opt.state[p0]["step"].item() == 0


# -------------------------------------------------------------------------------- checkpoints


def test_master_weights_checkpoint_round_trip_keeps_fp32_state(tmp_path):
    p = torch.nn.Parameter(torch.randn(40).bfloat16())
    opt = pyeff.optim.Adagrad([p], lr=0.1, master_weights=True)
    train([p], opt, 3, seed=0)
    sd = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = pyeff.optim.Adagrad([q], lr=0.1, master_weights=True)
    opt2.load_state_dict(sd)
    for key in ("sum", "master_param"):
        assert opt2.state[q][key].dtype == torch.float32
        assert torch.equal(opt2.state[q][key], opt.state[p][key])
    # ... and torch.optim.Adagrad can read it (fp32 sum cast to the parameter's dtype).
    r = torch.nn.Parameter(p.detach().clone())
    opt3 = torch.optim.Adagrad([r], lr=0.1)
    opt3.load_state_dict(sd)
    assert opt3.state[r]["sum"].dtype == torch.bfloat16


# ------------------------------------------------------------------------ mixed-precision step


def _scaler(kind):
    cls = torch.amp.GradScaler if kind == "torch" else pyeff.amp.GradScaler
    scaler = cls("cpu", init_scale=2.0**10, growth_interval=1)
    scaler.scale(torch.ones(()))  # creates the scale tensor, as the first scale(loss) does
    return scaler


@pytest.mark.parametrize("scaler_kind", ["torch", "pyeff"])
@pytest.mark.parametrize("bad", ["inf", "nan"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "with-sparse"])
def test_overflow_skips_the_step_bitwise(scaler_kind, bad, where, sparse):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(5,), (40, 3), (7,)]]
    opt = pyeff.optim.Adagrad(params, lr=0.1, lr_decay=0.1)
    scaler = _scaler(scaler_kind)
    train(params, opt, 2, seed=0)  # non-trivial state
    grads = [torch.randn(p.shape) * scaler.get_scale() for p in params]
    k = {"first": 0, "middle": 1, "last": 2}[where]
    grads[k].view(-1)[min(3, grads[k].numel() - 1)] = float(bad)
    for p, g in zip(params, grads):
        p.grad = g
    if sparse:  # the middle parameter gets a sparse gradient (holding the bad value if it is the one)
        g = grads[1]
        params[1].grad = torch.sparse_coo_tensor(torch.tensor([[0, 3, 3, 39]]), g[:4].clone(), (40, 3))
    snapshot = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    assert bool(opt.last_step_skipped)
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    after = opt.state_dict()
    for idx, st_before in snapshot["state"].items():
        for key, value in st_before.items():
            assert torch.equal(after["state"][idx][key], value), (idx, key)


@pytest.mark.parametrize("scaler_kind", ["torch", "pyeff"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "with-sparse"])
def test_scaled_step_matches_unscaled_torch_step(scaler_kind, sparse):
    torch.manual_seed(0)
    ma = _Embeddings(sparse=sparse)
    mb = copy.deepcopy(ma)
    opt_a = torch.optim.Adagrad(ma.parameters(), lr=0.1)
    opt_b = pyeff.optim.Adagrad(mb.parameters(), lr=0.1)
    scaler = _scaler(scaler_kind)
    for idx, bag in _sparse_batches(4):
        opt_a.zero_grad()
        opt_b.zero_grad()
        ma(idx, bag).backward()
        scaler.scale(mb(idx, bag)).backward()
        opt_a.step()
        scaler.step(opt_b)
        scaler.update()
        assert not bool(opt_b.last_step_skipped)
    assert_optimizers_match(list(ma.parameters()), list(mb.parameters()), opt_a, opt_b, torch.float32)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_max_grad_norm_equals_clip_grad_norm_then_step(max_norm):
    params = make_params(torch.float32)
    a, b, opt_a, opt_b = _pair(params, dict(lr=0.1, weight_decay=0.01), dict(lr=0.1, weight_decay=0.01,
                                                                            max_grad_norm=max_norm))
    for step in range(5):
        set_grads(step, a, b)
        for p in a:
            p.grad.mul_(3.0)
        for p in b:
            p.grad.mul_(3.0)
        norm = torch.nn.utils.clip_grad_norm_(a, max_norm)
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(opt_b.grad_norm, norm)
    assert_optimizers_match(a, b, opt_a, opt_b, torch.float32)


def test_max_grad_norm_with_sparse_gradients_clips_the_values():
    torch.manual_seed(0)
    m = _Embeddings()
    ref = copy.deepcopy(m)
    opt = pyeff.optim.Adagrad(m.parameters(), lr=0.1, max_grad_norm=0.1)
    opt_ref = torch.optim.Adagrad(ref.parameters(), lr=0.1)
    idx, bag = _sparse_batches(1)[0]
    m(idx, bag).backward()
    ref(idx, bag).backward()
    grads = [p.grad.coalesce() if p.grad.is_sparse else p.grad for p in ref.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(g._values() if g.is_sparse else g) for g in grads]))
    for p, g in zip(ref.parameters(), grads):
        p.grad = g * (0.1 / (norm + 1e-6))
    opt.step()
    opt_ref.step()
    torch.testing.assert_close(opt.grad_norm, norm)
    assert_optimizers_match(list(ref.parameters()), list(m.parameters()), opt_ref, opt, torch.float32)


def test_max_grad_norm_skips_on_non_finite_gradient():
    p = torch.nn.Parameter(torch.randn(10))
    opt = pyeff.optim.Adagrad([p], max_grad_norm=1.0)
    p.grad = torch.randn(10)
    p.grad[4] = float("nan")
    before = p.detach().clone()
    opt.step()
    assert bool(opt.last_step_skipped) and torch.equal(p.detach(), before)
    assert opt.state[p]["step"].item() == 0


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_master_weights_track_fp32_training(low, sparse):
    torch.manual_seed(0)
    m32 = _Embeddings(sparse=sparse)
    mlow = copy.deepcopy(m32).to(low)
    with torch.no_grad():  # both start from the same (rounded) values
        for p32, plow in zip(m32.parameters(), mlow.parameters()):
            p32.copy_(plow)
    opt32 = torch.optim.Adagrad(m32.parameters(), lr=0.05)
    opt_low = pyeff.optim.Adagrad(mlow.parameters(), lr=0.05, master_weights=True)
    for idx, bag in _sparse_batches(10):
        opt32.zero_grad()
        opt_low.zero_grad()
        m32(idx, bag).backward()
        mlow(idx, bag).backward()
        # The same gradients for both (rounded to the low precision): only the update is compared.
        for p32, plow in zip(m32.parameters(), mlow.parameters()):
            if p32.grad.is_sparse:
                g = plow.grad.coalesce()
                p32.grad = torch.sparse_coo_tensor(g._indices(), g._values().float(), g.shape)
            else:
                p32.grad = plow.grad.float()
        opt32.step()
        opt_low.step()
    for p32, plow in zip(m32.parameters(), mlow.parameters()):
        st_low = opt_low.state[plow]
        assert st_low["sum"].dtype == st_low["master_param"].dtype == torch.float32
        torch.testing.assert_close(st_low["master_param"], p32.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st_low["sum"], opt32.state[p32]["sum"], rtol=1e-5, atol=1e-6)
        assert torch.equal(plow.detach(), st_low["master_param"].to(low))


def test_kahan_summation_beats_plain_bf16():
    torch.manual_seed(0)
    ref = torch.randn(4000) + 4.0  # large values: bf16 spacing 2**-5, updates far below it
    p32 = torch.nn.Parameter(ref.clone())
    plain = torch.nn.Parameter(ref.bfloat16())
    kahan = torch.nn.Parameter(ref.bfloat16())
    opts = [torch.optim.Adagrad([p32], lr=1e-3), pyeff.optim.Adagrad([plain], lr=1e-3),
            pyeff.optim.Adagrad([kahan], lr=1e-3, kahan_summation=True)]
    start = ref.bfloat16().float()
    for step in range(30):
        g = torch.randn(4000)
        for p, opt in zip((p32, plain, kahan), opts):
            p.grad = g.to(p.dtype)
            opt.step()
    moved = p32.detach() - ref
    err_plain = (plain.detach().float() - start - moved).abs().mean()
    err_kahan = (kahan.detach().float() + opts[2].state[kahan]["compensation"].float() - start - moved).abs().mean()
    assert "compensation" in opts[2].state[kahan]
    assert err_kahan < 0.1 * err_plain
