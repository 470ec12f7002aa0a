"""The CUDA optimizer kernels (csrc/cuda/*.cu) run on the CPU through NOTE [CUDA emulation]
(tests/cpp/cuda_emulation.h), against the CPU kernels (the same math, csrc/<op>_math.h: the same
bits) and the references. Built with small chunks and small argument tables, so that a few small
tensors already take many chunks, a grid that strides over them, and several launches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _optim_cases import (ADAGRAD_HP, ADAGRAD_LISTS, ADAM_COMBOS, ADAM_HP, ADAM_LISTS, CHUNK, SGD_HP, SGD_LISTS, SIZES,
                          adagrad_inputs, adam_inputs, assert_equal, clone, grads_of_every_dtype, sgd_inputs)
from pyeff.ops import adagrad_step, adam_step, grad_stats, sgd_step, step_control

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
OPTIMIZER_SOURCES = ["adam.cu", "adagrad.cu", "sgd.cu", "grad_stats.cu", "step_control.cu"]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """torch.ops.pyeff_emulated: each optimizer .cu file compiled as C++ for the CPU."""
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("cuda_emulation")
    wrappers = []
    for name in OPTIMIZER_SOURCES:  # one translation unit per .cu, as nvcc compiles them
        w = build / f"emulated_{Path(name).stem}.cpp"
        w.write_text(f'#include "{(ROOT / "csrc" / "cuda" / name).as_posix()}"\n')
        wrappers.append(str(w))
    flags = ["-O1", "-ffp-contract=off", "-DPYEFF_CUDA_EMULATION", f"-DPYEFF_MTA_CHUNK={CHUNK}",
             "-DPYEFF_MTA_PARAM_BYTES=1200", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests' / 'cpp'}"]
    load("pyeff_cuda_emulation", wrappers, extra_cflags=flags, build_directory=str(build), is_python_module=False,
         verbose=False)
    return torch.ops.pyeff_emulated


def test_every_optimizer_source_is_emulated():
    optimizer_like = {p.name for p in SOURCES} - {"cuda_pool.cu"}
    assert optimizer_like <= set(OPTIMIZER_SOURCES), optimizer_like - set(OPTIMIZER_SOURCES)


def _run_emulated_adam(ops, x, hp, grad_mult=None, found_inf=None, lr_tensor=None):
    with torch.no_grad():
        ops.adam_step(*[x[k] for k in ADAM_LISTS], hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"],
                      hp["amsgrad"], hp["maximize"], hp["decoupled_weight_decay"], grad_mult, found_inf, lr_tensor)


@pytest.mark.parametrize("dtype,grad_dtype,mode", ADAM_COMBOS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("hp", ADAM_HP, ids=["adamw-amsgrad", "adam-maximize"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_adam_matches_the_cpu_kernel_bitwise(emulated, dtype, grad_dtype, mode, hp, offset):
    inputs = adam_inputs(SIZES, dtype, grad_dtype, mode, hp["amsgrad"], offset)
    got, cpu, ref = clone(inputs), clone(inputs), clone(inputs)
    if mode == "master":  # the parameter is an output only: poison it
        for p in got["params"]:
            p.fill_(float("nan"))
    mult = torch.tensor([0.37])
    _run_emulated_adam(emulated, got, hp, grad_mult=mult)
    adam_step(**cpu, **hp, grad_mult=mult, backend="cpu")
    assert_equal(got, cpu, "emulated cuda vs cpu")
    adam_step(**ref, **hp, grad_mult=mult, backend="reference")
    for a, b in zip(got["params"], ref["params"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if dtype.itemsize == 2 else 1e-5, atol=1e-2)
    assert [s.item() for s in got["state_steps"]] == [s.item() + 1 for s in inputs["state_steps"]]


STATE_CASES = [("int8", False), ("int8", True), (torch.bfloat16, False), (torch.bfloat16, True)]
STATE_IDS = [f"{s}{'-sr' if r else ''}".replace("torch.", "") for s, r in STATE_CASES]


@pytest.mark.parametrize("state,sr", STATE_CASES, ids=STATE_IDS)
@pytest.mark.parametrize("dtype,mode", [(torch.float32, "plain"), (torch.bfloat16, "plain"), (torch.bfloat16, "master")],
                         ids=["fp32", "bf16", "bf16-master"])
def test_adam_with_compressed_state_matches_the_cpu_kernel_bitwise(emulated, dtype, mode, state, sr):
    inputs = adam_inputs(SIZES, dtype, dtype, mode, True, state=state, sr=sr)
    got, cpu = clone(inputs), clone(inputs)
    _run_emulated_adam(emulated, got, ADAM_HP[0], grad_mult=torch.tensor([0.37]))
    adam_step(**cpu, **ADAM_HP[0], grad_mult=torch.tensor(0.37), backend="cpu")
    assert_equal(got, cpu, "emulated cuda vs cpu")


def _run_emulated_adagrad(ops, x, hp, grad_mult=None, found_inf=None):
    with torch.no_grad():
        ops.adagrad_step(*[x[k] for k in ADAGRAD_LISTS], hp["lr"], hp["lr_decay"], hp["weight_decay"], hp["eps"],
                         hp["maximize"], grad_mult, found_inf, None)


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "plain"), (torch.float64, "plain"), (torch.bfloat16, "plain"),
                                        (torch.bfloat16, "master"), (torch.float16, "kahan")],
                         ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("sparse", [0, 3], ids=["dense", "dense+sparse"])
def test_adagrad_matches_the_cpu_kernel_bitwise(emulated, dtype, mode, sparse):
    inputs = adagrad_inputs(dtype, mode, sparse_rows=[30, 25, 9][:sparse])
    hp = dict(ADAGRAD_HP, weight_decay=0.0 if sparse else 0.1)
    got, cpu = clone(inputs), clone(inputs)
    _run_emulated_adagrad(emulated, got, hp, grad_mult=torch.tensor([0.25]))
    adagrad_step(**cpu, **hp, grad_mult=torch.tensor(0.25), backend="cpu")
    assert_equal(got, cpu, "emulated cuda vs cpu")


@pytest.mark.parametrize("state,sr", STATE_CASES, ids=STATE_IDS)
def test_adagrad_with_compressed_state_matches_the_cpu_kernel_bitwise(emulated, state, sr):
    inputs = adagrad_inputs(torch.bfloat16, "plain", state=state, sr=sr)
    got, cpu = clone(inputs), clone(inputs)
    _run_emulated_adagrad(emulated, got, ADAGRAD_HP, grad_mult=torch.tensor([0.25]))
    adagrad_step(**cpu, **ADAGRAD_HP, grad_mult=torch.tensor(0.25), backend="cpu")
    assert_equal(got, cpu, "emulated cuda vs cpu")


def test_adagrad_sparse_index_outside_the_parameter_is_a_device_assert(emulated):
    inputs = adagrad_inputs(torch.float32, "plain")
    inputs["params"].append(torch.randn(6, 2))
    inputs["grads"].append(torch.sparse_coo_tensor(torch.tensor([[0, 6]]), torch.randn(2, 2), (6, 2),
                                                   check_invariants=False))
    inputs["state_sums"].append(torch.rand(6, 2))
    inputs["state_steps"].append(torch.tensor(0.0))
    with pytest.raises(RuntimeError, match="device-side assert"):
        _run_emulated_adagrad(emulated, inputs, ADAGRAD_HP)


# ---------------------------------------------------------------- sgd


def _run_emulated_sgd(ops, x, hp, grad_mult=None, found_inf=None, lr_tensor=None):
    with torch.no_grad():
        ops.sgd_step(*[x[k] for k in SGD_LISTS], hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"],
                     hp["nesterov"], hp["maximize"], grad_mult, found_inf, lr_tensor)


@pytest.mark.parametrize("dtype,grad_dtype,mode", ADAM_COMBOS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("hp", SGD_HP, ids=["dampening-maximize", "nesterov", "plain"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_sgd_matches_the_cpu_kernel_bitwise(emulated, dtype, grad_dtype, mode, hp, offset):
    inputs = sgd_inputs(SIZES, dtype, grad_dtype, mode, hp["momentum"], offset)
    got, cpu, ref = clone(inputs), clone(inputs), clone(inputs)
    if mode == "master":  # the parameter is an output only: poison it
        for p in got["params"]:
            p.fill_(float("nan"))
    mult = torch.tensor([0.37])
    _run_emulated_sgd(emulated, got, hp, grad_mult=mult)
    sgd_step(**cpu, **hp, grad_mult=mult, backend="cpu")
    for b in got["momentum_buffers"]:  # first-step buffers were NaN: written
        assert not b.isnan().any()
    assert_equal(got, cpu, "emulated cuda vs cpu")
    sgd_step(**ref, **hp, grad_mult=mult, backend="reference")
    for a, b in zip(got["params"], ref["params"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if dtype.itemsize == 2 else 1e-5, atol=1e-2)


# What the ops with a tensor lr (Adam, SGD) share: (run emulated, inputs, hyper-parameters, op, a
# state list that a bad dtype in makes the op refuse).
TENSOR_LR_OPS = {
    "adam": (_run_emulated_adam, lambda sizes, mode: adam_inputs(sizes, *_dtypes(mode), mode, True),
             ADAM_HP[0], adam_step, "exp_avgs"),
    "sgd": (_run_emulated_sgd, lambda sizes, mode: sgd_inputs(sizes, *_dtypes(mode), mode, True),
            SGD_HP[0], sgd_step, "momentum_buffers"),
}


def _dtypes(mode):
    return (torch.float32, torch.float32) if mode == "plain" else (torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("op", TENSOR_LR_OPS)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_a_tensor_lr_is_read(emulated, op, lr_dtype):
    run, make, hp, step, _ = TENSOR_LR_OPS[op]
    inputs = make(SIZES[:6], "plain")
    got, want = clone(inputs), clone(inputs)
    lr = torch.tensor(0.02, dtype=lr_dtype)
    run(emulated, got, {**hp, "lr": 123.0}, lr_tensor=lr)  # the float is ignored
    step(**want, **{**hp, "lr": lr}, backend="cpu")
    assert_equal(got, want, "tensor lr")


@pytest.mark.parametrize("op", TENSOR_LR_OPS)
def test_found_inf_leaves_everything_bitwise(emulated, op):
    run, make, hp, _, _ = TENSOR_LR_OPS[op]
    inputs = make(SIZES, "kahan")
    got = clone(inputs)
    run(emulated, got, hp, grad_mult=torch.tensor([0.5]), found_inf=torch.tensor([1.0]))
    assert_equal(got, inputs, "skipped step")


@pytest.mark.parametrize("op", TENSOR_LR_OPS)
def test_bad_input_is_rejected_before_writing(emulated, op):
    run, make, hp, _, state = TENSOR_LR_OPS[op]
    inputs = make([5, 9], "plain")
    inputs[state][1] = inputs[state][1].double()
    snap = clone(inputs)
    with pytest.raises(RuntimeError, match=rf"expected {state}\[1\] to be Float, got Double"):
        run(emulated, inputs, hp)
    assert_equal(inputs, snap, "bad input")


def test_grad_stats_matches_the_reference_and_is_deterministic(emulated, monkeypatch):
    grads = grads_of_every_dtype()
    want = grad_stats(grads, backend="reference")
    got = torch.full((2,), float("nan"))
    emulated.grad_stats(grads, got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    again = torch.full((2,), float("nan"))
    emulated.grad_stats(grads, again)
    assert torch.equal(got, again)
    monkeypatch.setenv("PYEFF_EMULATED_BLOCKS", "1")  # another grid: another (close) order of sums
    other = torch.full((2,), float("nan"))
    emulated.grad_stats(grads, other)
    torch.testing.assert_close(other, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [(0, 0), (5, CHUNK - 1), (7, 3 * CHUNK + 6), (22, 76)])
def test_grad_stats_finds_a_nonfinite_element_anywhere(emulated, value, where):
    grads = grads_of_every_dtype()
    t, i = where
    grads[t][i] = value
    out = torch.zeros(2)
    emulated.grad_stats(grads, out)
    assert out[1].item() == 1.0


def test_grad_stats_of_no_elements(emulated):
    out = torch.full((2,), float("nan"))
    emulated.grad_stats([torch.empty(0)], out)
    assert out.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("stats,scale,found,max_norm", [
    ([30.0, 0.0], [1024.0], None, 1.0), ([0.25, 0.0], None, None, 5.0), ([4.0, 1.0], [2.0], None, 0.0),
    (None, [65536.0], [0.0], 0.0), (None, None, [1.0], 0.0), ([float("inf"), 1.0], [8.0], [0.0], 2.0)])
def test_step_control_matches_the_reference(emulated, stats, scale, found, max_norm):
    def t(x):
        return None if x is None else torch.tensor(x)

    got, want = torch.full((4,), float("nan")), torch.full((4,), float("nan"))
    emulated.step_control(t(stats), t(scale), t(found), max_norm, got)
    step_control(t(stats), t(scale), t(found), max_norm, want, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
