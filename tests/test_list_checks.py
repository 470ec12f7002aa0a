"""pyeff._C's C loops over lists of tensors (csrc/list_checks.cpp) against what they stand for in
Python: random lists of tensors that differ in device, dtype, layout, contiguity and shape."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyeff import _ext

pytestmark = pytest.mark.skipif(_ext.list_checks() is None, reason="pyeff._C is not built")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _tensor(kind: str, dtype: torch.dtype, device: str, shape: tuple[int, ...]) -> torch.Tensor:
    if kind == "sparse":
        return torch.sparse_coo_tensor(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, *shape[1:], dtype=dtype),
                                       shape, device=device)
    t = torch.randn(*shape[::-1], dtype=dtype, device=device) if device != "meta" else torch.empty(
        *shape[::-1], dtype=dtype, device=device)
    return t.t() if kind == "transposed" else t.reshape(shape) if kind == "plain" else t.t().contiguous()


specs = st.tuples(st.sampled_from(["plain", "plain", "plain", "transposed", "sparse"]), st.sampled_from(DTYPES),
                  st.sampled_from(["cpu", "cpu", "meta"]), st.sampled_from([(3, 2), (2, 3), (1, 5)]))
tensors = specs.map(lambda spec: _tensor(*spec))


def _one_bucket(key_lists) -> bool:
    first = key_lists[0]
    return bool(first) and len({t.device for t in first}) == 1 and all(
        len(ts) > 0 and len({t.dtype for t in ts}) == 1 for ts in key_lists)


def _all_contiguous(lists) -> bool:
    return all(t.layout == torch.strided and t.is_contiguous() for ts in lists for t in ts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(specs, max_size=5), min_size=1, max_size=3), st.booleans())
def test_one_bucket_and_all_contiguous_match_python(spec_lists, uniform):
    if uniform:  # make the common case common: one device, one dtype per list
        spec_lists = [[(kind, ss[0][1], spec_lists[0][0][2] if spec_lists[0] else "cpu", shape)
                       for kind, _, _, shape in ss] for ss in spec_lists]
    key_lists = [[_tensor(*spec) for spec in ss] for ss in spec_lists]
    checks = _ext.list_checks()
    assert checks.one_bucket(key_lists) == _one_bucket(key_lists)
    assert checks.all_contiguous(key_lists) == _all_contiguous(key_lists)


def test_items_that_are_not_tensors():
    checks = _ext.list_checks()
    t = torch.zeros(2)
    assert not checks.one_bucket([[t, None]]) and not checks.all_contiguous([[t, None]])
    assert checks.all_contiguous([[], [t]])
    with pytest.raises(TypeError):
        checks.one_bucket(None)
    with pytest.raises(TypeError, match=r"params\[1\] is not a tensor"):
        checks.grads_signature([torch.nn.Parameter(t), 3])

    class OddGrad(torch.Tensor):
        grad = "not a tensor"

    with pytest.raises(TypeError, match=r"params\[0\].grad is not a tensor"):
        checks.grads_signature([t.as_subclass(OddGrad)])


def _described(params) -> list:
    """What the signature stands for: which parameters have a gradient, and the dtype, layout,
    device and shape of each such parameter and of its gradient."""
    return [None if p.grad is None else
            tuple((t.dtype, t.layout, t.device, t.shape) for t in (p, p.grad)) for p in params]


dense_specs = specs.filter(lambda spec: spec[0] != "sparse")


pairs = st.lists(st.tuples(dense_specs, specs | st.none()), max_size=4)
# b: drawn on its own, a's specs again, or a's with one thing changed (which parameter, param or
# grad, which field, and the new value's draw).
edits = st.none() | st.just("copy") | st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 3), specs)


def _edited(a, edit):
    """a with one field of one parameter's or gradient's spec taken from `other`."""
    i, which, field, other = edit
    if not a:
        return a
    i %= len(a)
    pair = list(a[i])
    spec = list(pair[which] or other)
    spec[field] = other[field]
    if which == 0 and spec[0] == "sparse":  # parameters are dense
        spec[0] = "transposed"
    pair[which] = tuple(spec)
    return [*a[:i], tuple(pair), *a[i + 1:]]


@settings(max_examples=400, deadline=None)
@given(pairs, pairs, edits)
def test_grads_signature(a, b, edit):
    b = b if edit is None else a if edit == "copy" else _edited(a, edit)
    def params(pairs):
        out = []
        for (kind, dtype, device, shape), grad_spec in pairs:
            if grad_spec is None:
                out.append(torch.nn.Parameter(_tensor(kind, dtype, device, shape)))
                continue
            # A gradient set while the parameter matched it, then the parameter replaced through
            # .data (same device) by one of another dtype, shape or layout: the signature sees both.
            g = _tensor(*grad_spec)
            param = torch.nn.Parameter(torch.empty(g.shape, dtype=dtype, device=g.device))
            param.grad_dtype = None
            param.grad = g
            param.data = _tensor(kind, dtype, grad_spec[2], shape)
            out.append(param)
        return out

    pa, pb = params(a), params(b)
    checks = _ext.list_checks()
    grads_a, sig_a = checks.grads_signature(pa)
    _, sig_b = checks.grads_signature(pb)
    assert len(grads_a) == sum(p.grad is not None for p in pa)
    assert all(g is p.grad for g, p in zip(grads_a, [p for p in pa if p.grad is not None]))
    assert (sig_a == sig_b) == (_described(pa) == _described(pb))


def _state_described(state, params, keys) -> list:
    """What state_lists' signature stands for: per parameter its state dict (identity), the dict's
    length and the identity of each value under `keys` (None where absent)."""
    out = []
    for p in params:
        d = state.get(p)
        out.append((id(d) if d is not None else None, len(d) if d is not None else 0,
                    *(id(d.get(k)) if d is not None and k in d else None for k in keys)))
    return out


EDITS = ("none", "replace value", "add entry", "delete entry", "drop state", "copy dict", "new state", "same value")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5), st.lists(st.sets(st.sampled_from(["a", "b", "c"])), min_size=0, max_size=5),
       st.sampled_from(EDITS), st.integers(0, 4))
def test_state_lists(n, key_sets, edit, at):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(n)]
    state = {p: {k: torch.zeros(1) for k in ks} for p, ks in zip(params, key_sets)}  # some params without state
    keys = ("a", "b", "c")
    checks = _ext.list_checks()
    columns, before = checks.state_lists(state, params, keys)
    for k, column in zip(keys, columns):
        assert len(column) == n and all(v is state.get(p, {}).get(k) for v, p in zip(column, params))
    described = _state_described(state, params, keys)
    if params:  # the edit, on one parameter's state
        p = params[at % n]
        d = state.get(p)
        if edit == "replace value" and d:
            d[next(iter(d))] = torch.zeros(1)
        elif edit == "add entry" and d is not None:
            d["d"] = 1
        elif edit == "delete entry" and d:
            del d[next(iter(d))]
        elif edit == "drop state":
            state.pop(p, None)
        elif edit == "copy dict" and d is not None:
            state[p] = dict(d)
        elif edit == "new state" and d is None:
            state[p] = {}
        elif edit == "same value" and d:
            k = next(iter(d))
            d[k] = d[k]
    _, after = checks.state_lists(state, params, keys)
    assert (after == before) == (_state_described(state, params, keys) == described)


def test_state_lists_reads_a_defaultdict_as_a_dict():
    from collections import defaultdict

    p = torch.nn.Parameter(torch.zeros(1))
    state = defaultdict(dict)
    (column,), _ = _ext.list_checks().state_lists(state, [p], ("a",))
    assert column == [None] and p not in state  # no default made
    state[p] = 3
    with pytest.raises(TypeError, match=r"the state of params\[0\] is not a dict"):
        _ext.list_checks().state_lists(state, [p], ("a",))


class _SameHash(torch.Tensor):
    def __hash__(self):
        return 7


def test_state_lists_finds_keys_hashed_as_python_does():
    # Exact tensors are looked up by their address (torch.Tensor.__hash__ is id); anything else
    # through its own __hash__, which must agree with where the dict stored it.
    exact, other = torch.nn.Parameter(torch.zeros(1)), torch.zeros(1).as_subclass(_SameHash)
    plain_state, other_state = {"a": torch.zeros(1)}, {"a": torch.ones(1)}
    state = {exact: plain_state, other: other_state}
    (column,), _ = _ext.list_checks().state_lists(state, [exact, other, torch.zeros(1)], ("a",))
    assert column[0] is plain_state["a"] and column[1] is other_state["a"] and column[2] is None
