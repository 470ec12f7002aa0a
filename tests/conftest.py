"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit function is defined, so that
Triton kernels run on the CPU through the interpreter (no GPU needed)."""

import getpass
import os
import subprocess
import sys
import tempfile
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile's kernel cache is not keyed on ATEN_CPU_CAPABILITY: a suite run with it (to test an
# AVX2 machine's code paths on an AVX-512 one) that reuses kernels compiled without it gets wrong
# results or a corrupted heap, with plain torch models too. Such a run gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different, reproducible seed per test: inputs are random, never zeros, never shared.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poison():
    """torch.empty (also at::empty in the C++ ops) returns NaN-filled memory: an element a kernel
    forgets to write fails the comparison."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


ISAS = ("default", "avx2", "avx512")


@pytest.fixture(scope="session")
def machine_isa():
    """The best ISA the CPU kernels can run with on this machine (whatever PYEFF_CPU_ISA says here)."""
    env = {k: v for k, v in os.environ.items() if k != "PYEFF_CPU_ISA"}
    code = "import pyeff._ext as e; print(e.cpu_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split()[-1]


@pytest.fixture
def run_with_isa(machine_isa):
    """run(code, isa, *args): `python -c code *args` with PYEFF_CPU_ISA=isa, asserting that the CPU
    kernels ran with that ISA, or with the machine's best where it lacks it; returns the ISA that ran."""
    def run(code: str, isa: str, *args) -> str:
        probe = "\nimport pyeff._ext as _isa_probe\nprint('pyeff-cpu-isa', _isa_probe.cpu_isa())\n"
        out = subprocess.run([sys.executable, "-c", code + probe, *map(str, args)], capture_output=True, text=True,
                             env={**os.environ, "PYEFF_CPU_ISA": isa})
        assert out.returncode == 0, out.stderr
        ran = out.stdout.split("pyeff-cpu-isa")[-1].strip()
        assert ran == min(isa, machine_isa, key=ISAS.index), (isa, machine_isa, ran)
        return ran

    return run


@pytest.fixture
def same_bits_on_every_isa(run_with_isa, tmp_path):
    """check(code): run `code`, which torch.save()s a list of tensors to sys.argv[1], with each ISA
    (run_with_isa) and assert that every run wrote the same bits."""
    def check(code: str) -> None:
        outs = []
        for isa in reversed(ISAS):
            run_with_isa(code, isa, tmp_path / f"{isa}.pt")
            outs.append(torch.load(tmp_path / f"{isa}.pt"))
        for other in outs[1:]:
            assert len(other) == len(outs[0])
            for a, b in zip(outs[0], other):
                assert torch.equal(a, b)

    return check
