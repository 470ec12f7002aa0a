"""Compressed optimizer state in the optimizers: the format of each parameter's moments, their
creation and conversion (checkpoints), the seeds of stochastic rounding, and the plain state_dict
that torch.optim loads.

NOTE [state formats]
A group's `state_dtype` decides how its moments are stored (the kernels: NOTE [compressed
optimizer state] in csrc/state_codec.h):
- None (the default): torch.optim's layout, the parameter's dtype (fp32 next to master weights);
- torch.float32 / torch.bfloat16: that dtype, for fp32, bf16 and fp16 parameters alike;
- "int8": int8 block codes (state[key]: the codes, laid out like the parameter; state[key +
  "_absmax"]: each block's fp32 absmax) for parameters of at least MIN_QUANT_NUMEL elements, fp32
  moments for smaller ones (their codes would save little, and a vector of norm scales is what
  adapts most per element).
fp64 and complex parameters keep uncompressed state in their own dtype whatever the group asks.
The format is applied where state is made (the first step; Adagrad's constructor) and where it is
loaded (load_state_dict converts a checkpoint's moments, e.g. a torch.optim one, to the group's
format); a step uses the state as it finds it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.state_codec import dequantize_state, quantize_state

STATE_DTYPES = (None, torch.float32, torch.bfloat16, "int8")
MIN_QUANT_NUMEL = 4096
CODES = (torch.int8, torch.uint8)
# The group settings pyeff adds to torch.optim's: left out of torch_state_dict(), and kept from
# the optimizer when a checkpoint without them (torch.optim's) is loaded.
PYEFF_GROUP_KEYS = ("master_weights", "kahan_summation", "state_dtype", "stochastic_rounding", "seed")
_SEED_MASK = 2**63 - 1


def check_state_args(state_dtype, stochastic_rounding, differentiable) -> None:
    if not any(state_dtype is d or state_dtype == d for d in STATE_DTYPES):
        raise ValueError(f"Invalid state_dtype: {state_dtype!r}; expected None, torch.float32, torch.bfloat16 or "
                         "'int8'")
    if differentiable and (state_dtype is not None or stochastic_rounding):
        raise RuntimeError("`differentiable` does not support `state_dtype` or `stochastic_rounding`: use the "
                           "default state")


def check_group(group: dict) -> None:
    """The state settings of a group (groups can be edited after construction): checked at every step."""
    check_state_args(group.get("state_dtype"), group.get("stochastic_rounding"), group.get("differentiable"))
    if group.get("stochastic_rounding") and not (group.get("master_weights") or group.get("kahan_summation")):
        if any(p.dtype == torch.float16 for p in group["params"]):
            raise RuntimeError("`stochastic_rounding` rounds bfloat16 values; float16 parameters need "
                               "`master_weights=True` or `kahan_summation=True`")


def absmax_key(key: str) -> str:
    return key + "_absmax"


def moment_format(group: dict, p: Tensor, master: bool):
    """The storage of p's moments in `group`: a dtype, or "int8" (NOTE [state formats])."""
    state_dtype = group.get("state_dtype")
    if p.dtype == torch.float64 or torch.is_complex(p):
        return p.dtype
    if state_dtype is None:
        return torch.float32 if master else p.dtype
    if state_dtype == "int8":
        if type(p).__name__ == "DTensor":  # NOTE [DTensor parameters]: each rank steps its shard
            raise RuntimeError("`state_dtype='int8'` does not support DTensor (FSDP2) parameters: the blocks of a "
                               "shard's codes would not be those of the whole tensor; use state_dtype=torch.bfloat16")
        return "int8" if p.numel() >= MIN_QUANT_NUMEL else torch.float32
    return state_dtype


def new_moment(state: dict, key: str, signed: bool, p: Tensor, fmt, fill: float = 0.0) -> None:
    """state[key] (and its absmax) filled with `fill`, in format `fmt`, laid out like p."""
    state.pop(absmax_key(key), None)
    if fmt != "int8":
        value = complex(fill, fill) if torch.is_complex(p) else fill
        state[key] = torch.full_like(p, value, dtype=fmt, memory_format=torch.preserve_format)
        return
    value = torch.full_like(p, fill, dtype=torch.float32, memory_format=torch.preserve_format)
    store_moment(state, key, signed, value, fmt)


def load_moment(state: dict, key: str, signed: bool) -> Tensor:
    """state[key] in fp32 (codes dequantized), laid out as stored."""
    t = state[key]
    if t.dtype in CODES:
        return dequantize_state(t, state[absmax_key(key)])
    return t.to(torch.float32) if t.dtype in (torch.bfloat16, torch.float16) else t


def store_moment(state: dict, key: str, signed: bool, value: Tensor, fmt) -> None:
    """state[key] := value in format `fmt` (int8 codes quantized with round to nearest even)."""
    state.pop(absmax_key(key), None)
    if fmt != "int8":
        state[key] = value.to(fmt)
        return
    codes, absmax = quantize_state(value.to(torch.float32), "int8" if signed else "uint8")
    state[key] = codes
    state[absmax_key(key)] = absmax


def conform_moments(group: dict, p: Tensor, state: dict, moments: tuple[tuple[str, bool], ...], master: bool) -> None:
    """Convert p's moments to the group's format where they are in another (a loaded checkpoint)."""
    fmt = moment_format(group, p, master)
    for key, signed in moments:
        t = state.get(key)
        if t is None:
            continue
        coded = t.dtype in CODES
        if fmt == "int8":
            # codes laid out like p are kept as they are: requantizing would add error
            if coded and absmax_key(key) in state and (t.stride() == p.stride() or p.numel() <= 1):
                continue
        elif not coded and t.dtype == fmt:
            continue
        value = load_moment(state, key, signed)
        if fmt == "int8" and value.stride() != p.stride():  # codes' blocks follow p's memory order
            value = torch.empty_like(p, dtype=torch.float32).copy_(value)
        store_moment(state, key, signed, value.to(p.device), fmt)


def rng_seeds(optimizer, group: dict, params: list[Tensor]) -> list[int]:
    """One seed per parameter for stochastic rounding (NOTE [random bits]): the group's seed plus
    the parameter's place among all the optimizer's parameters, so that every parameter draws its
    own bits, the same in every run from that seed."""
    if not group.get("stochastic_rounding"):
        return []
    if group.get("seed") is None:
        group["seed"] = draw_seed()
    offset = 0
    for g in optimizer.param_groups:
        if g is group:
            break
        offset += len(g["params"])
    index = {id(p): offset + k for k, p in enumerate(group["params"])}
    return [(group["seed"] + index[id(p)]) & _SEED_MASK for p in params]


def draw_seed() -> int:
    """A seed from torch's default generator (so that torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def loaded(optimizer, state_dict: dict, moments: tuple[tuple[str, bool], ...]):
    """(state_dict for torch's load_state_dict, finish): torch.optim casts every floating state
    tensor to its parameter's dtype, and replaces the groups' settings by the checkpoint's. So the
    checkpoint's moments, absmax and master weights are set aside first and put back by finish(),
    converted to each group's format, and a setting the checkpoint lacks (a torch.optim one) keeps
    the optimizer's value."""
    groups = []
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups):
        groups.append({**{k: group[k] for k in PYEFF_GROUP_KEYS if k in group}, **saved})
    keys = {k for key, _ in moments for k in (key, absmax_key(key))} | {"master_param"}
    kept = {(idx, key): value for idx, st in state_dict["state"].items() for key, value in st.items()
            if key in keys and torch.is_tensor(value)}

    def finish() -> None:
        index_to_param = dict(zip((i for g in groups for i in g["params"]),
                                  (p for g in optimizer.param_groups for p in g["params"])))
        for (idx, key), value in kept.items():
            p = index_to_param[idx]
            optimizer.state[p][key] = value.to(device=p.device, copy=True)
        for group in optimizer.param_groups:
            master = group.get("master_weights", False)
            for p in group["params"]:
                if p in optimizer.state:
                    low = master and p.dtype in (torch.bfloat16, torch.float16)
                    conform_moments(group, p, optimizer.state[p], moments, low)

    return {**state_dict, "param_groups": groups}, finish


def torch_state_dict(optimizer, moments: tuple[tuple[str, bool], ...]) -> dict:
    """The state_dict torch.optim's optimizer of the same name loads and continues from: moments
    in fp32 (codes dequantized, bf16 widened), without absmax, master weights, compensation
    buffers or pyeff's group settings (NOTE [state formats]; README says what precision is lost)."""
    sd = optimizer.state_dict()
    keys = {key for key, _ in moments}
    state = {}
    for idx, st in sd["state"].items():
        out = {}
        for key, value in st.items():
            if key == "step":
                out[key] = value.clone()
            elif key in keys and value is None:  # torch.optim.SGD's momentum_buffer without momentum
                out[key] = None
            elif key in keys:
                signed = dict(moments)[key]
                widened = load_moment(st, key, signed)
                out[key] = widened.clone() if widened is value else widened
        state[idx] = out
    groups = [{k: v for k, v in g.items() if k not in PYEFF_GROUP_KEYS} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}
