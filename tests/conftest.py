"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit function is defined, so that
Triton kernels run on the CPU through the interpreter (BUILD-NOTES.md)."""

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

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
