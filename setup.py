"""Build pyeff's compiled extension `pyeff._C`.

- C++ CPU kernels are always built. Each `csrc/cpu/*_kernel.cpp` is compiled once per instruction
  set (DEFAULT, AVX2, AVX512 on x86-64), and the best one the running CPU supports is picked at
  run time (csrc/cpu/isa.cpp). See NOTE [per-ISA kernels] below.
- CUDA sources (csrc/cuda/*.cu) are added when torch has CUDA and nvcc is found.
- The binary is portable (it runs on any x86-64; the kernels use AVX2/AVX-512 where the CPU has
  them). PYEFF_NATIVE=1 tunes everything for the building CPU (-march=native): such a binary may
  crash with SIGILL on an older CPU.

Build with `pip install --no-build-isolation -e .` against an installed torch.
"""

import os
import platform
import re
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
_BUILD = runpy.run_path(str(ROOT / "pyeff" / "_build.py"))  # the compiler flags (pyeff is not built yet)

# NOTE [per-ISA kernels]
# at::vec::Vectorized picks its instruction set at compile time from CPU_CAPABILITY_* macros and
# has no run-time dispatch inside an extension. So each kernel source is compiled once per ISA, with
# that ISA's -m flags (the compiler then defines __AVX2__ and the like, which Sleef and at::vec test)
# and CPU_CAPABILITY naming the inline namespace its code lives in, as ATen builds its own kernels.
# _BuildExt.build_extension compiles those objects through the same ninja-driven compile as every
# other source, one output folder per ISA (so incremental builds cover them too), and links them
# after the baseline objects, DEFAULT variants first: an inline function that several objects
# define (a c10 or std template) resolves to the first definition, which is then baseline code.
# csrc/cpu/isa.cpp checks the same features before picking a variant.
_X86_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c", "-mbmi",
               "-mbmi2"],
}


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _isa_flags() -> dict[str, list[str]]:
    return {"DEFAULT": [], **(_X86_ISA_FLAGS if _is_x86() else {})}


def _rel(paths):
    return sorted(Path(p).relative_to(ROOT).as_posix() for p in paths)


KERNELS = _rel(ROOT.glob("csrc/cpu/*_kernel.cpp"))


def _extension():
    plain = _rel(p for p in ROOT.glob("csrc/**/*.cpp") if p.name not in {Path(k).name for k in KERNELS})
    cuda_sources = _rel(ROOT.glob("csrc/**/*.cu"))

    cxx = list(_BUILD["CXX_FLAGS"])  # the C++ standard is torch's (its headers need it)
    if os.environ.get("PYEFF_NATIVE", "0") not in ("", "0"):
        cxx.append("-march=native")
    macros = []
    # setuptools relinks only when a listed file is newer than the module: name the kernels (built
    # by _BuildExt.build_extension), the headers and this file (its flags), not just the sources.
    depends = KERNELS + _rel(ROOT.glob("csrc/**/*.h")) + ["setup.py", "pyeff/_build.py"]

    use_cuda = bool(cuda_sources) and _cuda_toolkit_usable()
    if use_cuda:
        macros.append(("PYEFF_WITH_CUDA", "1"))
        archs = os.environ.get("PYEFF_CUDA_ARCHS", "80;90").split(";")
        nvcc = _BUILD["nvcc_flags"](archs)  # NOTE [kernel numerics flags] in pyeff/_build.py
        return cpp_extension.CUDAExtension(
            "pyeff._C",
            plain + cuda_sources,
            define_macros=macros,
            depends=depends,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "pyeff._C",
        plain,
        define_macros=macros,
        depends=depends,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


# NOTE [one C++ runtime]
# pyeff._C must use the libstdc++ that Python and torch already loaded. A second, static copy in the
# process keeps its own locale state, so formatting a number into an error message (every
# TORCH_CHECK with a size in it) fails: here the message arrives cut short; on the H200 image of
# 2026-11-28 (Python 3.12.3, g++ 13.3, torch 2.11) `_C` held such a copy and the process crashed.
# Removing -static-libstdc++ from the link flags (below) did not cure that image, and where its copy
# came from is not known. So the link also names the runtime this process loaded: the linker then
# resolves every libstdc++ symbol from it (NEEDED libstdc++.so.6) before it reaches the driver's own
# -lstdc++, static or not, and the symbol versions are those that exist at run time. Forcing
# -static-libstdc++ onto that link leaves the module correct (tests/test_build.py). Every build then
# runs pyeff/_cxx_runtime.py on the result and fails, saying why, if a C++ error does not reach
# Python whole: a clear build error rather than a module that crashes.
_CXX_RUNTIME = ROOT / "pyeff" / "_cxx_runtime.py"  # loaded by path: pyeff itself is not built yet


class _BuildExt(cpp_extension.BuildExtension):
    _STATIC = ("-static-libstdc++", "-static-libgcc")

    def finalize_options(self):
        super().finalize_options()
        # One build folder for every build, editable ones included (pip's editable build would
        # otherwise use a new temporary folder): ninja then recompiles only what changed.
        self.build_temp = str(ROOT / "build" / "temp")

    def build_extension(self, ext):
        # NOTE [per-ISA kernels]: the kernels, once per ISA with its flags, linked after the rest.
        # The ISAs' builds (a ninja run each, in its own folder) run at once: one after another,
        # each waited for its slowest object, and a 16-core build took three times as long.
        def compile_for(isa, flags):
            extra = {**ext.extra_compile_args, "cxx": [*ext.extra_compile_args["cxx"], *flags]}
            return self.compiler.compile(
                [str(ROOT / k) for k in KERNELS], output_dir=os.path.join(self.build_temp, "isa", isa),
                macros=[*ext.define_macros, ("CPU_CAPABILITY", isa), (f"CPU_CAPABILITY_{isa}", None)],
                include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=extra, depends=ext.depends)

        with ThreadPoolExecutor() as pool:
            builds = [pool.submit(compile_for, isa, flags) for isa, flags in _isa_flags().items()]
            ext.extra_objects = [o for b in builds for o in b.result()]
        super().build_extension(ext)

    def build_extensions(self):
        for attr in ("linker_so", "linker_so_cxx"):
            cmd = getattr(self.compiler, attr, None)
            if cmd:
                setattr(self.compiler, attr, [a for a in cmd if a not in self._STATIC])
        runtime = runpy.run_path(str(_CXX_RUNTIME))["loaded_cxx_runtime"]()
        for ext in self.extensions:
            ext.extra_link_args = [a for a in ext.extra_link_args if a not in self._STATIC]
            if runtime:
                ext.extra_link_args.append(runtime)
        super().build_extensions()
        for ext in self.extensions:
            self._check_error_path(self.get_ext_fullpath(ext.name))

    @staticmethod
    def _check_error_path(path):
        out = subprocess.run([sys.executable, str(_CXX_RUNTIME), path], capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            why = (out.stdout + out.stderr).strip().splitlines()[-3:] or [f"exit status {out.returncode}"]
            raise RuntimeError(
                f"pyeff: the built {path} does not pass C++ errors to Python intact: " + " | ".join(why) +
                ". Its link has a second copy of libstdc++ (see NOTE [one C++ runtime] in setup.py); check "
                "`readelf -d` for NEEDED libstdc++.so.6 and the link flags (LDFLAGS, CXX, Python's LDSHARED)."
            )
        print(f"pyeff: {Path(path).name}: C++ errors reach Python intact (pyeff/_cxx_runtime.py)")


def _locate_toolkit() -> None:
    """Without CUDA_HOME, torch guesses the toolkit as the folder above the first nvcc on PATH, which
    is wrong when that nvcc is a wrapper (/usr/local/bin/nvcc): the C++ files that include CUDA
    headers then fail. Ask nvcc where its toolkit is (`--dryrun` prints it as TOP) and use that."""
    home = Path(cpp_extension.CUDA_HOME)
    if (home / "include" / "cuda_runtime.h").exists():
        return
    out = subprocess.run([str(home / "bin" / "nvcc"), "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True,
                         text=True)
    top = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
    if top and (Path(top.group(1)) / "include" / "cuda_runtime.h").exists():
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = str(Path(top.group(1)).resolve())
        print(f"pyeff: CUDA toolkit at {cpp_extension.CUDA_HOME} (set CUDA_HOME to choose another)")


def _cuda_toolkit_usable() -> bool:
    """Whether to compile the CUDA sources: torch has CUDA and a toolkit of the same major version
    is installed (torch refuses to build with another; the CPU kernels are then built alone)."""
    import torch

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    _locate_toolkit()
    nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
    try:
        release = re.search(r"release (\d+)\.", subprocess.run([str(nvcc), "--version"], capture_output=True,
                                                               text=True).stdout)
    except OSError:
        release = None
    toolkit = release.group(1) if release else None
    if toolkit != torch.version.cuda.split(".")[0]:
        print(f"pyeff: torch was built with CUDA {torch.version.cuda} but the toolkit at {cpp_extension.CUDA_HOME} "
              f"is CUDA {toolkit or '(unknown)'}: building the CPU kernels only. Point CUDA_HOME at a CUDA "
              f"{torch.version.cuda.split('.')[0]}.x toolkit to build the CUDA kernels too.")
        return False
    return True


packages = find_packages(include=["pyeff", "pyeff.*"]) + ["pyeff.kernels"]

setup(
    packages=packages,
    package_dir={"pyeff.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
    zip_safe=False,
)
