"""The CUDA pluggable pool (csrc/allocator/cuda_pool.cu): linked alone everywhere nvcc exists (every
.cu file is compile-checked in tests/test_build.py); allocating through torch where there is a GPU."""

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pyeff.memory as mem

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc")
SYMBOLS = ("pyeff_cuda_pool_alloc", "pyeff_cuda_pool_free", "pyeff_cuda_pool_empty_cache",
           "pyeff_cuda_pool_set_max_cached_bytes", "pyeff_cuda_pool_num_stats", "pyeff_cuda_pool_stat_name",
           "pyeff_cuda_pool_stats", "pyeff_cuda_pool_reset_peak_stats")


@pytest.fixture(scope="module")
def standalone_library(tmp_path_factory):
    """The pool core and the CUDA functions linked alone into a shared library (cudart static)."""
    if NVCC is None:
        pytest.skip("needs nvcc")
    lib = tmp_path_factory.mktemp("cuda_pool") / "libpyeff_cuda_pool.so"
    cmd = [NVCC, "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-I{ROOT / 'csrc'}",
           str(ROOT / "csrc/allocator/pool.cpp"), str(ROOT / "csrc/allocator/cuda_pool.cu"), "-o", str(lib)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return str(lib)


def test_standalone_library_exports_the_c_abi(standalone_library):
    lib = ctypes.CDLL(standalone_library)
    for name in SYMBOLS:
        assert hasattr(lib, name), name
    stats = mem.cuda_stats(library=standalone_library)
    assert len(stats) == lib.pyeff_cuda_pool_num_stats() and "allocated_bytes.all.current" in stats
    if _cpu_pool_built():
        assert list(stats) == list(mem.stats())  # the same keys as the CPU pool
    mem.cuda_set_max_cached_bytes(1 << 30, library=standalone_library)
    mem.cuda_empty_cache(library=standalone_library)
    lib.pyeff_cuda_pool_free(None, ctypes.c_size_t(0), 0, None)  # a null pointer is ignored
    if not torch.cuda.is_available():
        # Without a GPU cudaMalloc fails: the pool answers NULL and counts the failure.
        lib.pyeff_cuda_pool_alloc.restype = ctypes.c_void_p
        lib.pyeff_cuda_pool_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        assert lib.pyeff_cuda_pool_alloc(1 << 20, 0, None) is None
        assert mem.cuda_stats(library=standalone_library)["num_ooms"] >= 1


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_c_abi_over_a_fake_cuda_runtime(tmp_path):
    # cuda_pool.cu compiled as C++ against tests/cpp/fake_cuda/cuda_runtime.h (host memory), under
    # AddressSanitizer: per-stream pools, per-device statistics, out-of-memory retries, cudaFree
    # given only what cudaMalloc returned (tests/cpp/cuda_pool_abi.cpp).
    exe = tmp_path / "cuda_pool_abi"
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-pthread", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           f"-I{ROOT / 'tests/cpp/fake_cuda'}", f"-I{ROOT / 'csrc'}", "-x", "c++",
           str(ROOT / "csrc/allocator/cuda_pool.cu"), "-x", "none", str(ROOT / "csrc/allocator/pool.cpp"),
           str(ROOT / "tests/cpp/cuda_pool_abi.cpp"), "-o", str(exe)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 and "sanitize" in out.stderr:
        pytest.skip(f"the compiler has no AddressSanitizer runtime: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "ok"


def _cpu_pool_built() -> bool:
    from pyeff import _ext

    return _ext.available()


def test_cuda_functions_explain_what_is_missing():
    from pyeff import _ext

    if _ext.built_with_cuda():
        pytest.skip("pyeff._C has the CUDA pool here")
    with pytest.raises(RuntimeError, match="CUDA"):
        mem.cuda_allocator()
    if _ext.available():
        with pytest.raises(RuntimeError, match="built without the CUDA pool"):
            mem.cuda_stats()


GPU_SCRIPT = textwrap.dedent("""
    import torch, pyeff.memory as mem
    mode = "{mode}"
    if mode == "global":
        mem.use_cuda_pool()  # before any CUDA allocation
        ctx = None
    else:
        pool = mem.cuda_mem_pool()
        ctx = torch.cuda.use_mem_pool(pool)
    import contextlib
    with ctx or contextlib.nullcontext():
        x = torch.randn(1 << 20, device="cuda")
        y = x * 2 + 1
        small = torch.arange(10, device="cuda")
        s = mem.cuda_stats()
        # Globally the pool serves every tensor; under a MemPool, torch's caching allocator asks it
        # for whole segments and places tensors inside them.
        assert s["allocation.all.current"] >= (3 if mode == "global" else 1), s
        assert s["allocated_bytes.all.current"] >= 2 * 4 * (1 << 20), s
        assert torch.allclose(y.cpu(), x.cpu() * 2 + 1) and small.sum().item() == 45
        ptr = y.data_ptr()
        del y
        z = torch.empty(1 << 20, device="cuda")
        if mode == "global":
            assert z.data_ptr() == ptr, "the block freed last is reused"
        # a model's training step, in the pool
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).cuda()
        opt = torch.optim.AdamW(model.parameters())
        for step in range(3):
            model(torch.randn(32 * (step + 1), 64, device="cuda")).square().mean().backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        del x, z, small, model, opt
    if mode == "global":
        mem.cuda_empty_cache()
        s = mem.cuda_stats()
        assert s["num_cache_hits"] > 0 and s["num_os_allocs"] > 0, s
        print(mem.cuda_stats()["reserved_bytes.all.current"], "bytes still reserved")
    print("ok")
""")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["global", "mem_pool"])
def test_cuda_pool_allocates_for_torch(mode):
    # A fresh process: torch accepts a pluggable allocator only before its first CUDA allocation.
    from pyeff import _ext

    assert _ext.built_with_cuda(), "build pyeff against a torch with CUDA, with nvcc on the PATH"
    if mode == "mem_pool" and not hasattr(torch.cuda, "MemPool"):
        pytest.skip("torch.cuda.MemPool is missing in this torch")
    out = subprocess.run([sys.executable, "-c", GPU_SCRIPT.format(mode=mode)], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")
