"""A byte-level corpus every machine has offline: the Python standard library's own source files.

Files are read in sorted order; every 20th file goes to validation, so the split is by file (no
text is in both). The batch of global step s is a function of (seed, s) alone: random windows of the
training bytes drawn from a generator seeded with both, of which rank r takes rows
[r * batch, (r + 1) * batch). Resuming at step s therefore needs no sampler state, and the ranks
together see exactly the batch one process would see with `world * batch` rows.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

VAL_EVERY = 20


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    if len(files) < VAL_EVERY:
        raise RuntimeError(f"found only {len(files)} Python files under {root}; pass --corpus DIR with more text")
    return files


def load_corpus(root: str | Path | None = None, max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) byte tensors (uint8). `max_bytes` caps the training text (the first files)."""
    train, val = bytearray(), bytearray()
    for i, path in enumerate(stdlib_files(root)):
        if i % VAL_EVERY == VAL_EVERY - 1:
            val += path.read_bytes()
        elif max_bytes is None or len(train) < max_bytes:
            train += path.read_bytes()
    if max_bytes is not None:
        del train[max_bytes:]
    return torch.frombuffer(train, dtype=torch.uint8).clone(), torch.frombuffer(val, dtype=torch.uint8).clone()


def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs data[s : s + seq_len] and next-byte targets data[s + 1 : s + seq_len + 1], as int64."""
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def train_batch(data: torch.Tensor, step: int, seed: int, rank: int, world: int, batch: int, seq_len: int):
    """This rank's share of global step `step`'s batch (see the module docstring)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq_len - 1, (world * batch,), generator=g)
    return windows(data, starts[rank * batch:(rank + 1) * batch], seq_len)


def val_batches(data: torch.Tensor, count: int, batch: int, seq_len: int, seed: int = 1234):
    """The same `count` validation batches on every call and every rank layout."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len - 1, (count, batch), generator=g)
    return [windows(data, s, seq_len) for s in starts]
