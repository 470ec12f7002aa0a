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
        # Without a GPU cudaMalloc fails (no device or driver): the pool answers NULL and counts no
        # out-of-memory error, which this is not.
        lib.pyeff_cuda_pool_alloc.restype = ctypes.c_void_p
        lib.pyeff_cuda_pool_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        assert lib.pyeff_cuda_pool_alloc(1 << 20, 0, None) is None
        assert mem.cuda_stats(library=standalone_library)["num_ooms"] == 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_pool_rules_over_a_fake_cuda_runtime(tmp_path):
    # cuda_pool.cu compiled as C++ against tests/cpp/fake_cuda/cuda_runtime.h (host memory), under
    # AddressSanitizer: per-stream reuse, record_stream events waited for before reuse, graph
    # captures in private pools with no cudaFree / event call during capture, the cap deferred, the
    # out-of-memory retry, the memory fraction, per-device statistics (tests/cpp/cuda_pool_test.cpp).
    exe = tmp_path / "cuda_pool_test"
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-pthread", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           f"-I{ROOT / 'tests/cpp/fake_cuda'}", f"-I{ROOT / 'tests/cpp'}", f"-I{ROOT / 'csrc'}", "-x", "c++",
           str(ROOT / "csrc/allocator/cuda_pool.cu"), "-x", "none", str(ROOT / "csrc/allocator/pool.cpp"),
           str(ROOT / "tests/cpp/cuda_pool_test.cpp"), "-o", str(exe)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 and "sanitize" in out.stderr:
        pytest.skip(f"the compiler has no AddressSanitizer runtime: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "ok"


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (nvcc may be a wrapper script elsewhere)."""
    roots = [os.environ.get("CUDA_HOME"), Path(NVCC).resolve().parent.parent if NVCC else None, "/usr/local/cuda"]
    for root in roots:
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None, reason="needs g++ and the CUDA headers")
def test_torch_glue_compiles_against_the_installed_torch():
    # csrc/allocator/cuda_allocator.cpp subclasses torch's CUDAPluggableAllocator; it is built only
    # where torch has CUDA, but torch's wheels ship the headers, so its use of them is checked here.
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{_cuda_include()}", f"-I{sysconfig.get_paths()['include']}",
                                                       f"-I{ROOT / 'csrc'}"]
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-c++20-extensions",
           "-DPYEFF_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *includes,
           str(ROOT / "csrc/allocator/cuda_allocator.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cuda_allocator.cpp" not in out.stderr, out.stderr[-3000:]  # no warning in pyeff's own code


def _cpu_pool_built() -> bool:
    from pyeff import _ext

    return _ext.available()


def test_cuda_functions_explain_what_is_missing():
    from pyeff import _ext

    if _ext.built_with_cuda():
        pytest.skip("pyeff._C has the CUDA pool here")
    assert not mem.cuda_pool_active()
    with pytest.raises(RuntimeError, match="CUDA"):
        mem.cuda_allocator()
    with pytest.raises(RuntimeError, match="CUDA"):
        mem.use_cuda_pool()
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


def _run_gpu_script(code: str) -> None:
    """A fresh process: torch accepts another allocator only before CUDA is first used."""
    from pyeff import _ext

    assert _ext.built_with_cuda(), "build pyeff against a torch with CUDA, with nvcc on the PATH"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["global", "mem_pool"])
def test_cuda_pool_allocates_for_torch(mode):
    if mode == "mem_pool" and not hasattr(torch.cuda, "MemPool"):
        pytest.skip("torch.cuda.MemPool is missing in this torch")
    _run_gpu_script(GPU_SCRIPT.format(mode=mode))


# The pool as torch's allocator, under torch's own rules (NOTE [CUDA pool as torch's allocator]).
TORCH_CONTRACT = {
    # A block read by another stream is not reused before that stream is done with it.
    "record_stream": """
        side = torch.cuda.Stream()
        n = 1 << 22
        # The kernels below, loaded once first: the first launch of a kernel may wait for the device
        # (lazy module loading), which would let the side stream finish before the host goes on.
        (torch.full((n,), 1.0, device="cuda") * 2).sum().item()
        torch.cuda._sleep(1)
        torch.cuda.synchronize()
        busy_seen = 0
        for _ in range(3):
            x = torch.full((n,), 1.0, device="cuda")
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.cuda._sleep(200_000_000)  # about 0.1 s: the consumer is slow, x must outlive its owner
                y = x * 2
            x.record_stream(side)
            ptr = x.data_ptr()
            del x
            busy = not side.query()  # while side runs, x's block must not come back
            z = torch.full((n,), 5.0, device="cuda")  # the producer's next buffer
            assert not (busy and z.data_ptr() == ptr), "reused while another stream still reads it"
            busy_seen += busy
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            assert bool((y == 2).all()), "the consumer saw the producer's next values"
            if z.data_ptr() != ptr:
                w = torch.empty(n, device="cuda")  # its uses are done: reusable now
                assert w.data_ptr() == ptr
                del w
            del y, z
        assert busy_seen, "the side stream was never busy when the host allocated: the test checked nothing"
    """,
    # A captured graph replays over memory that nothing else takes in between.
    "graph": """
        static_in = torch.randn(1 << 20, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                static_out = static_in * 3 + 1
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            tmp = static_in * 3
            static_out = tmp + 1
            del tmp
        junk = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(4)]  # must not get the graph's memory
        for v in (1.0, 2.0, 3.0):
            static_in.fill_(v)
            g.replay()
            torch.cuda.synchronize()
            assert torch.allclose(static_out, torch.full_like(static_out, 3 * v + 1)), v
            assert all(bool((j == 7).all()) for j in junk)
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g2, pool=g.pool()):  # a second graph sharing the first's pool
            out2 = static_out * 2
        g.replay(); g2.replay(); torch.cuda.synchronize()
        assert torch.allclose(out2, 2 * static_out)
        torch.cuda.empty_cache()  # the graphs' memory stays theirs
        junk += [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(4)]
        static_in.fill_(4.0)
        g.replay(); g2.replay(); torch.cuda.synchronize()
        assert torch.allclose(out2, torch.full_like(out2, 26.0)) and all(bool((j == 7).all()) for j in junk)
        reserved = torch.cuda.memory_reserved()
        del g, g2, static_out, out2
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved() < reserved  # released with the graphs
    """,
    # torch.cuda's statistics functions read the pool.
    "memory_stats": """
        x = torch.randn(1 << 20, device="cuda")
        s = torch.cuda.memory_stats()
        for key in ("allocated_bytes.all.current", "allocated_bytes.all.peak", "reserved_bytes.all.current",
                    "active_bytes.all.current", "requested_bytes.all.current", "allocation.all.current",
                    "segment.all.current", "num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free",
                    "num_sync_all_streams"):
            assert key in s, key
        assert torch.cuda.memory_allocated() == s["allocated_bytes.all.current"] >= x.numel() * 4
        assert torch.cuda.memory_reserved() >= torch.cuda.memory_allocated()
        y = torch.randn(1 << 22, device="cuda")
        del y
        torch.cuda.reset_peak_memory_stats()
        assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
        torch.cuda.reset_accumulated_memory_stats()
        assert torch.cuda.memory_stats()["num_device_alloc"] == 0
        assert "Allocated memory" in torch.cuda.memory_summary()
        before = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved() < before
    """,
    # Out of memory: caches go back and the request is retried; past that, torch.OutOfMemoryError.
    "out_of_memory": """
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(0.5)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            cached = torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")
            del cached  # cached on `side`
        retries = torch.cuda.memory_stats()["num_alloc_retries"]
        big = torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")  # needs side's cache
        assert torch.cuda.memory_stats()["num_alloc_retries"] > retries
        try:
            torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")
        except torch.OutOfMemoryError as e:
            assert "CUDA out of memory. Tried to allocate" in str(e), e
        else:
            raise AssertionError("no OutOfMemoryError")
        assert torch.cuda.memory_stats()["num_ooms"] == 1
        del big
        again = torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")  # recovered
        del again
        torch.cuda.set_per_process_memory_fraction(1.0)
        try:
            mem.cuda_mem_pool()
        except RuntimeError as e:
            assert "use_cuda_pool" in str(e)
        else:
            raise AssertionError("cuda_mem_pool() under use_cuda_pool()")
    """,
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(TORCH_CONTRACT))
def test_cuda_pool_as_torchs_allocator(case):
    body = textwrap.indent(textwrap.dedent(TORCH_CONTRACT[case]), "    ")
    _run_gpu_script("import torch, pyeff.memory as mem\nmem.use_cuda_pool()\nassert mem.cuda_pool_active()\n"
                    f"if True:\n{body}\nprint('ok')\n")
