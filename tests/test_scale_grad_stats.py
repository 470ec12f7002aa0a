"""scale_grad_stats (dst = src * scale, with grad_stats of dst, in one pass): backends vs reference."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

from pyeff.ops.grad_stats import grad_stats
from pyeff.ops.scale_grad_stats import scale_grad_stats

LOW = [torch.float32, torch.bfloat16, torch.float16]
PAIRS = list(itertools.product(LOW, LOW)) + [(torch.float64, torch.float64)]
SIZES = [0, 1, 31, 33, 65_537, 131_075]  # around the vector block and the 64K chunk


def _poisoned(n, dtype):
    return torch.full((n,), float("nan"), dtype=dtype)  # an element the kernel forgets stays NaN


@pytest.mark.parametrize("src_dtype, dst_dtype", PAIRS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(src_dtype, dst_dtype, n):
    src = torch.randn(n, dtype=src_dtype)
    outs = {}
    for backend in ("reference", "cpu"):
        dst = _poisoned(n, dst_dtype)
        outs[backend] = (scale_grad_stats(src, dst, 0.37, backend=backend), dst)
    (ref_stats, ref_dst), (got_stats, got_dst) = outs["reference"], outs["cpu"]
    assert torch.equal(got_dst, ref_dst)  # the same rounding, every element written
    torch.testing.assert_close(got_stats[0], ref_stats[0], rtol=1e-6, atol=0)
    assert got_stats[1].item() == ref_stats[1].item() == 0.0
    # The statistics are those of what was stored: what grad_stats finds reading dst afterwards.
    torch.testing.assert_close(got_stats, grad_stats([got_dst], backend="cpu"), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_in_place(dtype):
    x = torch.randn(70_001, dtype=dtype)
    expected = (x.to(torch.float64 if dtype == torch.float64 else torch.float32) * 0.5).to(dtype)
    stats = scale_grad_stats(x, x, 0.5, backend="cpu")
    assert torch.equal(x, expected)
    torch.testing.assert_close(stats[0], expected.double().square().sum().float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 40_000, 70_000])
def test_finds_nonfinite(value, where):
    src = torch.randn(70_001)
    src[where] = value
    for backend in ("reference", "cpu"):
        assert scale_grad_stats(src, torch.empty(70_001, dtype=torch.float16), 1.0, backend=backend)[1].item() == 1.0


def test_overflow_in_the_narrower_dst_is_found():
    src = torch.full((100,), 1e5)  # finite in fp32, inf once rounded to fp16
    assert scale_grad_stats(src, torch.empty(100, dtype=torch.float16), 1.0, backend="cpu")[1].item() == 1.0


def test_independent_of_thread_count():
    src = torch.randn(300_007)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = scale_grad_stats(src, torch.empty_like(src), 0.25, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = scale_grad_stats(src, torch.empty_like(src), 0.25, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


BAD = [
    (lambda: (torch.randn(5), torch.zeros(5, dtype=torch.float64)),
     r"float32, bfloat16 or float16 \(or both float64\)"),
    (lambda: (torch.randn(5, dtype=torch.float64), torch.zeros(5)),
     r"got (torch.float64|Double) and (torch.float32|Float)"),
    (lambda: (torch.randn(5), torch.zeros(6)), "5 elements"),
    (lambda: (torch.randn(4, 6).t(), torch.zeros(24)), "contiguous"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("make, message", BAD)
def test_bad_input_raises_before_writing(backend, make, message):
    src, dst = make()
    before = dst.clone()
    with pytest.raises(RuntimeError, match=message):
        scale_grad_stats(src, dst, 2.0, backend=backend)
    assert torch.equal(dst, before)


def test_overlapping_src_and_dst_raise():
    buf = torch.randn(10)
    with pytest.raises(RuntimeError, match="share storage"):
        scale_grad_stats(buf[:5], buf[5:], 2.0, backend="cpu")


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_lower_isa_builds_give_the_same_bits(isa, tmp_path):
    # The kernel is compiled once per ISA (NOTE [per-ISA kernels] in setup.py): every build writes
    # the same dst; the sum of squares is added in vector lanes as wide as the ISA's, so it may
    # differ in the last bits (as grad_stats's does).
    code = """
import sys, torch, pyeff
from pyeff.ops.scale_grad_stats import scale_grad_stats
torch.manual_seed(0)
src = torch.randn(70_001); out = []
for dst_dtype in (torch.float32, torch.bfloat16, torch.float16):
    dst = torch.empty(70_001, dtype=dst_dtype)
    out += [scale_grad_stats(src, dst, 0.3, backend="cpu"), dst]
torch.save(out, sys.argv[1])
"""
    best, low = tmp_path / "best.pt", tmp_path / "low.pt"
    subprocess.run([sys.executable, "-c", code, best], check=True, capture_output=True)
    subprocess.run([sys.executable, "-c", code, low], check=True, capture_output=True,
                   env={**os.environ, "PYEFF_CPU_ISA": isa})
    got, want = torch.load(low), torch.load(best)
    for i in range(0, len(got), 2):
        torch.testing.assert_close(got[i], want[i], rtol=1e-6, atol=0)
        assert torch.equal(got[i + 1], want[i + 1])


@pytest.mark.parametrize("make, message", BAD + [
    (lambda: (lambda buf: (buf[:5], buf[5:]))(torch.randn(10)), "share storage"),
])
def test_the_compiled_overload_checks_its_inputs_too(make, message):
    src, dst = make()
    before = dst.clone()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyeff.scale_grad_stats.cpu(src, dst, 2.0, torch.empty(2))
    assert torch.equal(dst, before)
