"""A small GPT (pre-norm decoder, learned positions, tied byte embedding) written in plain torch.nn,
so that `pyeff.nn.patch()` can swap its layers and `--stock` can leave them alone.

Two places know about pyeff, both optional:
- `add_norm` uses the fused residual-add + LayerNorm when the norm is pyeff's (after patch());
- the LM head computes `linear_cross_entropy` (the (tokens x vocab) logits never held) when
  `fused_head` is set, else `cross_entropy(linear(...))` as stock torch does.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyeff


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256  # bytes
    seq_len: int = 128
    layers: int = 4
    d_model: int = 192
    heads: int = 3
    dropout: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def add_norm(norm: nn.Module, x: torch.Tensor | None, residual: torch.Tensor):
    """(norm(x + residual), x + residual); one fused pass when `norm` is a pyeff norm."""
    if x is None:
        return norm(residual), residual
    if isinstance(norm, (pyeff.nn.LayerNorm, pyeff.nn.RMSNorm)):
        return norm(x, residual=residual)
    h = x + residual
    return norm(h), h


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # torch 2.13's CPU flash attention is 2x slower than the math path in bf16/fp16 at these sizes
        # (fwd + bwd, (16, 6, 128, 32): 14 ms vs 7 ms; equal in fp32), so ask for math there.
        slow_flash = x.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        with sdpa_kernel(SDPBackend.MATH) if slow_flash else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(d)
        # Linear directly followed by GELU in an nn.Sequential: patch() makes it one LinearGELU.
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d),
                                 nn.Dropout(cfg.dropout))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, fused_head: bool = False):
        super().__init__()
        if cfg.d_model % cfg.heads:
            raise ValueError(f"Invalid d_model {cfg.d_model}: must be a multiple of heads ({cfg.heads})")
        self.cfg, self.fused_head = cfg, fused_head
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.layers) ** 0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy of `idx` (batch, time) against `targets`."""
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"Invalid sequence length {t}: the model was built for at most {self.cfg.seq_len}")
        h = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        delta = None  # each sub-layer's output, added to the residual stream h by the next norm
        for blk in self.blocks:
            a, h = add_norm(blk.ln1, delta, h)
            delta = blk.attn(a)
            m, h = add_norm(blk.ln2, delta, h)
            delta = blk.mlp(m)
        y, _ = add_norm(self.ln_f, delta, h)
        if self.fused_head:
            return pyeff.nn.functional.linear_cross_entropy(y, self.wte.weight, targets)
        return F.cross_entropy(F.linear(y, self.wte.weight).flatten(0, 1), targets.flatten())
