"""patch(model): swap torch.nn layers for pyeff's fused ones, in place.

What is replaced (only modules of exactly these types, so subclasses with their own forward are
left alone, and only modules without hooks, whose callers could see a difference):

| torch module | becomes | state_dict |
| --- | --- | --- |
| nn.LayerNorm | pyeff.nn.LayerNorm | same keys |
| nn.RMSNorm | pyeff.nn.RMSNorm | same keys |
| nn.CrossEntropyLoss | pyeff.nn.CrossEntropyLoss | same keys (`weight`, when given) |
| nn.Linear (with bias) directly followed by nn.GELU inside an nn.Sequential | LinearGELU in the Linear's slot, nn.Identity in the GELU's | same keys |

The new modules hold the very Parameter and buffer objects of the old ones (no copy), so an
optimizer built before patch() keeps updating the live weights, and state_dicts load both ways:
a patched model loads the original checkpoints and its checkpoints load into the unpatched model.
The Linear + GELU pattern is proven by position only where it cannot be otherwise: an
nn.Sequential (not a subclass) feeds child i's output to child i + 1 and to nothing else.
A module shared by several parents is replaced by one new module in every place. The root module
itself is never replaced (it has no parent to hold the new one).
"""

from __future__ import annotations

import torch
from torch import nn

from .activation import LinearGELU


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                    "_backward_pre_hooks"))


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give `new` the very parameters and buffers of `old` and its train/eval mode; check that the
    state_dict keys did not change."""
    for name, p in old._parameters.items():
        setattr(new, name, p)
    for name, b in old._buffers.items():
        new._buffers[name] = b
    new.train(old.training)
    if list(new.state_dict().keys()) != list(old.state_dict().keys()):
        raise RuntimeError(f"pyeff.nn.patch: {type(new).__name__} would change the state_dict keys of the "
                           f"{type(old).__name__} it replaces ({list(old.state_dict())} -> {list(new.state_dict())}); "
                           "not patching")
    return new


def _dtype(m: nn.Module) -> torch.dtype | None:
    p = next(iter(m.parameters(recurse=False)), None)
    return p.dtype if p is not None else None


def _layer_norm(old: nn.LayerNorm) -> nn.Module:
    from . import LayerNorm

    new = LayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                    bias=old.bias is not None, device="meta", dtype=_dtype(old))
    return _adopt(new, old)


def _rms_norm(old: nn.Module) -> nn.Module:
    from . import RMSNorm

    new = RMSNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine, device="meta",
                  dtype=_dtype(old))
    return _adopt(new, old)


def _cross_entropy(old: nn.CrossEntropyLoss) -> nn.Module:
    from .loss import CrossEntropyLoss

    new = CrossEntropyLoss(weight=old.weight, ignore_index=old.ignore_index, reduction=old.reduction,
                           label_smoothing=old.label_smoothing)
    return _adopt(new, old)


def _linear_gelu(linear: nn.Linear, gelu: nn.GELU) -> nn.Module:
    from .functional import bias_gelu  # noqa: F401  (fail at patch time, not in the first forward)

    new = LinearGELU(linear.in_features, linear.out_features, device="meta", dtype=linear.weight.dtype,
                     approximate=gelu.approximate)
    return _adopt(new, linear)


def patch(model: nn.Module, *, norms: bool = True, cross_entropy: bool = True,
          linear_gelu: bool = True) -> list[tuple[str, nn.Module, nn.Module]]:
    """Replace, in place, the torch layers of `model` that pyeff has fused versions of (see the
    module docstring); returns one (qualified name, old module, new module) per replaced slot,
    parents in named_modules() order. `norms`, `cross_entropy`, `linear_gelu` turn each kind off. Run it before
    torch.compile and before wrapping the model (DDP, FSDP)."""
    singles = {}
    if norms:
        singles[nn.LayerNorm] = _layer_norm
        if hasattr(nn, "RMSNorm"):
            singles[nn.RMSNorm] = _rms_norm
    if cross_entropy:
        singles[nn.CrossEntropyLoss] = _cross_entropy

    new_for: dict[int, nn.Module] = {}  # id(old module) -> its replacement, shared by all its slots
    replaced: list[tuple[str, nn.Module, nn.Module]] = []
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        children = list(parent._modules.items())
        fused_gelu: set[str] = set()
        for i, (name, child) in enumerate(children):
            if child is None or name in fused_gelu:
                continue
            new = new_for.get(id(child))
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            if new is None and linear_gelu and type(parent) is nn.Sequential and type(child) is nn.Linear \
                    and child.bias is not None and type(nxt) is nn.GELU and not _has_hooks(child) \
                    and not _has_hooks(nxt):
                # Keyed by the Sequential slot, not the Linear: the pattern is a property of the slot.
                fused = _linear_gelu(child, nxt)
                gelu_name = children[i + 1][0]
                qual = f"{parent_name}." if parent_name else ""
                replaced += [(qual + name, child, fused), (qual + gelu_name, nxt, nn.Identity())]
                setattr(parent, name, fused)
                setattr(parent, gelu_name, replaced[-1][2])
                fused_gelu.add(gelu_name)
                continue
            if new is None and type(child) in singles and not _has_hooks(child):
                new = new_for[id(child)] = singles[type(child)](child)
            if new is not None:
                replaced.append((f"{parent_name}.{name}" if parent_name else name, child, new))
                setattr(parent, name, new)
    return replaced
