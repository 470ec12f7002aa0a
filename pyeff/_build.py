"""The compiler flags of pyeff._C, in one place: setup.py builds with them, and tests/test_build.py
compile-checks the CUDA sources with the same ones. Loaded by path (no import of pyeff, not built yet).

NOTE [kernel numerics flags]
Every backend of an optimizer op runs the same operations in the same order (csrc/<op>_math.h), so
no compiler may contract a multiply and an add into one rounding (-ffp-contract=off, nvcc
--fmad=false) or replace IEEE division and square root (no -ffast-math, no --use_fast_math).
-fno-trapping-math changes no result (nothing reads the floating-point exception flags): it lets
GCC turn a select between float values into a blend, without which the compressed-state loops of
csrc/cpu/state_io.h stay scalar.
"""

CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi",
             "-Wno-maybe-uninitialized"]  # the last two: false alarms from the at::vec headers


def nvcc_flags(archs: list[str]) -> list[str]:
    """nvcc's flags for real GPU code of each architecture in `archs` (e.g. ["80", "90"]) and PTX of
    the newest, which later GPUs compile at load time."""
    # -split-compile=0: optimize and assemble a file's kernels on every core (adam.cu instantiates
    # dozens, and is the last object of a parallel build).
    flags = ["-O3", "--fmad=false", "-lineinfo", "-split-compile=0"]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags
