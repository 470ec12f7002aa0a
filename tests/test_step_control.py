"""step_control (the mixed-precision step's control scalars, on the device): every backend against
the reference, bitwise (the same fp32 operations), on hand-picked and random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyeff
from pyeff.ops import step_control

BACKENDS = [b for b in pyeff.ops.OPS["step_control"].backends()
            if b != "reference" and pyeff.ops.backend_usable(b, torch.device("cpu")) is None]


def _t(x):
    return None if x is None else torch.tensor(x, dtype=torch.float32)


def _check(stats, scale, found, max_norm):
    want = step_control(_t(stats), _t(scale), _t(found), max_norm, torch.full((4,), float("nan")), backend="reference")
    for backend in BACKENDS:
        got = step_control(_t(stats), _t(scale), _t(found), max_norm, torch.full((4,), float("nan")), backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{backend}: {m}")
    return want


def test_clipping_and_unscaling_in_torchs_order():
    sumsq, scale, max_norm = 30.0, 1024.0, 0.1
    got = _check([sumsq, 0.0], [scale], None, max_norm)
    inv = torch.tensor(scale, dtype=torch.float64).reciprocal().float()  # GradScaler.unscale_'s reciprocal
    norm = torch.tensor(sumsq).sqrt() * inv
    clip = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s coefficient
    assert got.tolist() == [(inv * clip).item(), 0.0, norm.item(), 0.0]


def test_overflow_flags_combine_and_nonfinite_norms_stay_nonfinite():
    assert _check([4.0, 1.0], [2.0], [0.0], 1.0)[1].item() == 1.0
    assert _check(None, None, [1.0], 0.0).tolist() == [1.0, 1.0, 0.0, 0.0]
    got = _check([float("inf"), 1.0], [8.0], None, 2.0)
    assert got[2].item() == float("inf") and got[0].item() == 0.0


@pytest.mark.parametrize("bad,match", [
    (dict(out=torch.zeros(3)), r"float32 tensor of shape \(4,\)"),
    (dict(stats=torch.zeros(3)), r"`stats` to be float32 of shape \(2,\)"),
    (dict(max_grad_norm=-1.0), "Invalid max_grad_norm"),
    (dict(max_grad_norm=1.0), r"needs the gradients' `stats`"),
])
def test_bad_input_raises(bad, match):
    args = dict(stats=None, grad_scale=None, found_inf=None, max_grad_norm=0.0, out=torch.zeros(4))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        step_control(args["stats"], args["grad_scale"], args["found_inf"], args["max_grad_norm"], args["out"])


finite = st.floats(2.0**-100, 2.0**100, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(sumsq=st.one_of(st.none(), st.floats(0, 2.0**100, width=32), st.just(float("inf")), st.just(float("nan"))),
       nonfinite=st.sampled_from([0.0, 1.0]), scale=st.one_of(st.none(), finite),
       found=st.one_of(st.none(), st.sampled_from([0.0, 1.0])), max_norm=st.sampled_from([0.0, 1e-3, 0.5, 1.0, 100.0]))
def test_property_backends_match_reference(sumsq, nonfinite, scale, found, max_norm):
    stats = None if sumsq is None else [sumsq, nonfinite]
    if stats is None and max_norm > 0:
        max_norm = 0.0
    _check(stats, None if scale is None else [scale], None if found is None else [found], max_norm)
