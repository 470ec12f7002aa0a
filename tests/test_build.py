"""The package builds, loads its extension, and describes itself."""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyeff
from pyeff import _ext


def test_extension_is_built():
    assert _ext.available(), _ext.load_error()
    assert _ext.cpu_isa() in ("default", "avx2", "avx512")


def test_info_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "pyeff", "info", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["pyeff"] == pyeff.__version__
    assert data["torch"] == torch.__version__
    assert set(data["backends"]) == {"reference", "cpu", "cuda", "triton"}
    assert "cpu" in data["backends"]["cpu"]["usable_on"]
    assert data["cpu"]["threads"] == torch.get_num_threads()
    human = subprocess.run([sys.executable, "-m", "pyeff", "info"], capture_output=True, text=True, check=True).stdout
    assert "backends:" in human and "CPU kernels run with" in human


def test_import_without_extension_falls_back_with_one_warning(tmp_path):
    # Hide pyeff._C: import must still work, warn once, and ops must run on the reference.
    code = """
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "pyeff._C":
            raise ImportError("hidden for the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch, pyeff
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    opt = pyeff.optim.AdamW([p])
    opt.step(); opt.step()
msgs = [str(x.message) for x in w if "pyeff._C" in str(x.message)]
assert len(msgs) == 1, msgs
assert "pip install --no-build-isolation -e ." in msgs[0]
from pyeff.ops import OPS
assert OPS["adam_step"].choose(torch.device("cpu")) == "reference"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_lower_isa_variants_agree(same_bits_on_every_isa):
    # Each per-ISA build of the kernel computes the same numbers, bit for bit (same operations).
    code = """
import sys, torch, pyeff
torch.manual_seed(0)
p = torch.randn(1000); g = torch.randn(1000); m = torch.randn(1000); v = torch.rand(1000)
s = torch.zeros(())
torch.ops.pyeff.adam_step.cpu([p], [g], [m], [v], [], [s], [], [], [], [], [], [], lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8,
    weight_decay=0.1, amsgrad=False, maximize=False, decoupled_weight_decay=True)
torch.save([p, m, v], sys.argv[1])
"""
    same_bits_on_every_isa(code)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not shutil.which("objdump")
                    or not shutil.which("nm"), reason="needs x86-64, objdump and nm")
@pytest.mark.skipif(os.environ.get("PYEFF_NATIVE", "0") not in ("", "0"), reason="PYEFF_NATIVE=1: a native build")
def test_default_build_is_portable():
    # NOTE [per-ISA kernels] (setup.py): AVX instructions only in the AVX2/AVX512 variants. Checked:
    # every function outside them that the link may share between objects (global, weak) or that is
    # pyeff's own code.
    from pyeff import _C

    kinds = {}
    for line in subprocess.run(["nm", "--defined-only", _C.__file__], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            kinds[int(parts[0], 16)] = parts[1]
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    avx, name, check = {}, None, False
    for line in dis.splitlines():
        head = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if head:
            name = head.group(2)
            in_isa_variant = re.search(r"AVX(2|512)::|4AVX2|6AVX512", name)  # demangled or not
            shared = kinds.get(int(head.group(1), 16), "t") in "TW"
            check = not in_isa_variant and (shared or name.startswith("pyeff::"))
        elif check and re.search(r"%[yz]mm|\tv[a-z0-9]+\s", line):  # AVX registers, VEX-encoded instructions
            avx[name] = avx.get(name, 0) + 1
    assert not avx, f"{len(avx)} baseline functions use AVX, e.g. {list(avx)[:3]}"


CSRC = Path(__file__).resolve().parent.parent / "csrc"
CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_sources_compile(source, tmp_path):
    # What setup.py builds where torch has CUDA (its flags, for sm_80 and sm_90), checked here where
    # nothing built from it can run: no warning, and no register spills (ptxas -v).
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    from pyeff._build import nvcc_flags

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    cmd = ["nvcc", "-std=c++20", *nvcc_flags(["80", "90"]), *COMMON_NVCC_FLAGS, "--ptxas-options=-v", abi,
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{CSRC}", *[f"-I{p}" for p in include_paths()],
           "-Xcompiler", "-fPIC,-Wall", "-c", str(source), "-o", str(tmp_path / "out.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr.lower(), out.stderr
    spills = [line for line in out.stderr.splitlines() if "spill" in line and " 0 bytes spill stores, 0 bytes spill loads" not in line]
    assert not spills, spills


CXX_RUNTIME = Path(pyeff.__file__).resolve().parent / "_cxx_runtime.py"


def _probe(so_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CXX_RUNTIME), str(so_path)], capture_output=True, text=True)


def test_cpp_errors_reach_python_whole():
    # NOTE [one C++ runtime] (setup.py): run in a subprocess, as a broken runtime may crash it.
    from pyeff import _C

    out = _probe(_C.__file__)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
def test_extension_shares_the_processes_cpp_runtime():
    # NOTE [one C++ runtime] (setup.py): a statically linked libstdc++ made every error message crash.
    from pyeff import _C

    dynamic = subprocess.run(["readelf", "-dW", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in dynamic, "pyeff._C does not link libstdc++ dynamically"
    symbols = subprocess.run(["readelf", "-sW", "--dyn-syms", _C.__file__], capture_output=True, text=True).stdout
    defined = [line for line in symbols.splitlines() if "_ZNSo9_M_insert" in line and " UND " not in line]
    assert not defined, f"pyeff._C carries its own copy of libstdc++'s ostream: {defined[:2]}"


PROBE_EXT = """
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <cstdint>
static void probe(int64_t v) {
  TORCH_CHECK(false, "pyeff._C error path probe: ", static_cast<uint64_t>(v), " ", 0.5 * static_cast<double>(v));
}
TORCH_LIBRARY_FRAGMENT(pyeff, m) { m.def("error_path_probe(int value) -> ()", &probe); }
"""


@pytest.fixture(scope="module")
def static_runtime_probes(tmp_path_factory):
    """The failure setup.py guards against, made on purpose in a small module with the probe's op,
    linked with -static-libstdc++ alone ('static') and with the loaded runtime named first ('cured')."""
    if sys.platform != "linux" or shutil.which("g++") is None:
        pytest.skip("needs g++ on Linux")
    from torch.utils.cpp_extension import include_paths, library_paths

    from pyeff._cxx_runtime import loaded_cxx_runtime

    runtime = loaded_cxx_runtime()
    assert runtime and Path(runtime).exists()
    tmp = tmp_path_factory.mktemp("probe")
    src = tmp / "probe.cpp"
    src.write_text(PROBE_EXT)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    base = ["g++", "-std=c++17", "-w", "-O0", "-fPIC", "-shared", abi, str(src),
            *[f"-I{p}" for p in include_paths()], f"-L{library_paths()[0]}", "-lc10", "-ltorch_cpu"]
    results = {}
    for name, extra in {"static": [], "cured": [runtime]}.items():
        so = tmp / f"{name}.so"
        subprocess.run(base + extra + ["-static-libstdc++", "-o", str(so)], check=True, capture_output=True)
        results[name] = _probe(so)
    return results


def test_naming_the_loaded_runtime_cures_a_static_libstdcxx(static_runtime_probes):
    cured = static_runtime_probes["cured"]
    assert cured.returncode == 0, (cured.stdout, cured.stderr)


def test_probe_sees_what_a_static_libstdcxx_breaks(static_runtime_probes):
    static = static_runtime_probes["static"]
    if static.returncode == 0:  # as with torch 2.6 (old C++ ABI): its messages came through whole
        pytest.skip("a static libstdc++ does not break error messages with this torch")
    assert "arrived as" in static.stdout or static.returncode < 0, (static.returncode, static.stdout)
