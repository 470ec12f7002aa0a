"""The benchmark harness's timing order and ratios (benchmarks/_common.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common as bench  # noqa: E402


def test_interleaved_rounds_rotate_the_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench.interleaved(fns, rounds=3, warmup=1)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_rows_give_ratio_of_medians_and_median_of_paired_ratios():
    # The machine slows down 2x from the third round on (after the ceiling's turn in that round):
    # the medians come from different speeds, the per-round ratios do not.
    times = {bench.CEILING: [0.9, 0.9, 0.9, 2.0, 2.0], "k": [1.0, 1.1, 2.2, 2.2, 2.2], "t": [1.8] * 5}
    rows = {r.provider: r for r in bench.rows_from_times("s", "c", times, numel=10, bytes_per_elem=4,
                                                          torch_providers=("t",))}
    assert rows["k"].pct_ceiling == pytest.approx(100 * 0.9 / 2.2)
    assert rows["k"].extra["paired_pct_ceiling"] == pytest.approx(90.0)  # of 90, 81.8, 40.9, 90.9, 90.9
    assert rows["t"].extra["paired_pct_ceiling"] == pytest.approx(50.0)
    assert rows["k"].vs_best_torch == pytest.approx(1.8 / 2.2)
    assert rows["k"].gbps == pytest.approx(10 * 4 / 2.2 / 1e9)
    assert "paired_pct_ceiling" not in rows[bench.CEILING].extra


def test_bench_help_lists_every_suite():
    import subprocess

    from pyeff.cli import suites

    out = subprocess.run([sys.executable, "-m", "pyeff", "bench", "--help"], capture_output=True, text=True, check=True)
    listed = out.stdout.split("suites:", 1)[1]
    names = [line.split()[0] for line in listed.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert names == list(suites()) and "sgd" in names


def test_the_gpu_optimizer_suite_runs_its_cases_on_the_cpu():
    # benchmarks/optim_gpu.py runs only where a GPU is lent; its cases are run here on the CPU
    # backend with tiny sizes, so that the code a GPU session runs has run before.
    import torch

    import optim_gpu

    sizes = bench.model_like_sizes(20_000, 24)
    rows = optim_gpu.run_cases(sizes, torch.device("cpu"), ("cpu",), rounds=1)
    cases = {r.case.split()[0] for r in rows}
    assert cases == {"adamw", "amp", "adagrad", "sgd"}
    amp = {r.provider: r for r in rows if r.case.startswith("amp")}
    assert set(amp) == {"pyeff_cpu", "torch_composition", bench.CEILING}
    assert amp["torch_composition"].bytes_per_elem == 60 and amp["pyeff_cpu"].bytes_per_elem == 30
    assert all(r.pct_ceiling > 0 for r in rows)
