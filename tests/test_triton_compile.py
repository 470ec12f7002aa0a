"""Every Triton kernel the optimizers and layers launch compiles for an sm_90 GPU, checked without one
(tests/triton_compile_only.py): the interpreter, which runs them in the other tests, accepts code that
compiled Triton rejects (on the H200 run of 2026-11-29: plain Python globals read in a kernel)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from pyeff.ops._registry import triton_available  # noqa: E402

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_compile_only.py"))], env=env,
                         capture_output=True, text=True, timeout=1200)
    if out.returncode == 77:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    compiled = set(re.findall(r"^compiled (\w+)$", out.stdout, re.M))
    launched = set(re.findall(r"^def (_\w+_kernel)\(", "".join(p.read_text() for p in KERNELS.glob("*.py")), re.M))
    assert launched and launched <= compiled, f"never compiled: {sorted(launched - compiled)}"
