"""Every code block of README.md runs, so that the README cannot drift from the code.

A block may follow an HTML comment, which the rendered README does not show:
- ``<!-- test: setup`` ... ``-->``: Python run first in the same interpreter, defining what the
  block takes as given (a model, a data loader, input tensors);
- ``<!-- test: skip: why -->``: the block is not run, and the test says why.
Python blocks run each in a fresh interpreter, bash blocks in ``bash -e``, from the repository root.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?:<!-- test: (setup|skip:)(.*?)-->\n)?```(python|bash)\n(.*?)```", re.S)


def _blocks():
    text = (ROOT / "README.md").read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start(3)) + 1
        out.append(pytest.param(m.group(1), (m.group(2) or "").strip(), m.group(3), m.group(4), id=f"line{line}-{m.group(3)}"))
    return out


BLOCKS = _blocks()


def test_the_readme_has_code_blocks_and_every_one_is_collected():
    text = (ROOT / "README.md").read_text()
    assert len(BLOCKS) == text.count("```") // 2 >= 10


@pytest.mark.parametrize("directive,arg,lang,code", BLOCKS)
def test_readme_block_runs(directive, arg, lang, code):
    if directive == "skip:":
        pytest.skip(arg)
    if lang == "python":
        cmd = [sys.executable, "-c", (arg + "\n" if directive == "setup" else "") + code]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"README block failed:\n{code}\n--- stderr:\n{out.stderr[-3000:]}"
