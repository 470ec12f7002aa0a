"""grad_stats (sum of squares + non-finite flag in one read-only pass): backends vs reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyeff.ops import grad_stats

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _grads(sizes, dtypes):
    return [torch.randn(n, dtype=dt) for n, dt in zip(sizes, dtypes)]


def _check(grads):
    ref = grad_stats(grads, backend="reference")
    got = grad_stats(grads, backend="cpu")
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0, equal_nan=True)
    assert got[1].item() == ref[1].item()
    return got


def test_matches_reference_mixed_dtypes():
    sizes = [1, 7, 31, 33, 257, 65_537, 100_003, 0]
    got = _check(_grads(sizes, [DTYPES[i % 4] for i in range(len(sizes))]))
    assert got[1].item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["first", "middle", "tail"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_finds_nonfinite_anywhere(dtype, where, value):
    grads = _grads([100, 70_001, 45], [dtype] * 3)
    t, i = {"first": (0, 0), "middle": (1, 35_000), "tail": (2, 44)}[where]
    grads[t][i] = value
    assert _check(grads)[1].item() == 1.0


def test_large_finite_values_are_not_overflow():
    # 1e30**2 overflows fp32, but the gradient itself is finite: no skip.
    g = torch.randn(1000)
    g[3] = 1e30
    assert grad_stats([g], backend="cpu")[1].item() == 0.0
    assert grad_stats([g], backend="reference")[1].item() == 0.0


def test_independent_of_thread_count():
    grads = _grads([300_007, 12_345], [torch.float32, torch.bfloat16])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grad_stats(grads, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = grad_stats(grads, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_sparse_gradients_use_coalesced_values():
    i = torch.tensor([[0, 2, 2, 5]])
    v = torch.randn(4, 3)
    g = torch.sparse_coo_tensor(i, v, (7, 3), check_invariants=True)
    dense = g.to_dense()
    torch.testing.assert_close(grad_stats([g], backend="cpu")[0], dense.square().sum(), rtol=1e-6, atol=0)


def test_empty_list_is_an_error():
    with pytest.raises(ValueError, match="at least one gradient"):
        grad_stats([])


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=6, max_size=6),
       scale=st.sampled_from([1e-3, 1.0, 1e3]),
       bad=st.sampled_from([None, float("inf"), float("nan")]))
def test_property_matches_reference(sizes, dtypes, scale, bad):
    grads = [g * scale for g in _grads(sizes, dtypes)]
    nonempty = [g for g in grads if g.numel()]
    if bad is not None and nonempty:
        nonempty[-1][-1] = bad
    _check(grads)
