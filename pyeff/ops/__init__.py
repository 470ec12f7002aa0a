"""The op layer: each op's contract, its plain-PyTorch reference and the dispatch to a backend.

Backends: `reference` (plain torch, always there), `cpu` (C++ in pyeff._C), `cuda` (CUDA C++ in
pyeff._C), `triton`. Every backend of an op is an overload of one torch.library op with the
reference's schema, ``torch.ops.pyeff.<op>.<backend>`` (NOTE [one way to reach a kernel] in
_registry.py). PYEFF_BACKEND or an op's `backend=` argument forces one; by default the fastest
usable one for the tensors' device runs.
"""

from ._registry import BACKENDS, PREFERENCE, backend_usable
from .activation import (BIAS_GELU_BACKWARD, BIAS_GELU_FORWARD, SWIGLU_BACKWARD, SWIGLU_FORWARD,
                         bias_gelu_backward, bias_gelu_forward, swiglu_backward, swiglu_forward)
from .adagrad import ADAGRAD, adagrad_step
from .adam import ADAM, adam_step
from .cross_entropy import CROSS_ENTROPY, cross_entropy
from .grad_stats import GRAD_STATS, grad_stats
from .linear_cross_entropy import LINEAR_CROSS_ENTROPY, linear_cross_entropy
from .norm import NORM_BACKWARD, NORM_FORWARD, norm_backward, norm_forward
from .sgd import SGD, sgd_step
from .state_codec import DEQUANTIZE, QUANTIZE, dequantize_state, quantize_state
from .step_control import STEP_CONTROL, step_control

OPS = {op.name: op for op in (ADAGRAD, ADAM, GRAD_STATS, STEP_CONTROL, NORM_FORWARD, NORM_BACKWARD,
                              BIAS_GELU_FORWARD, BIAS_GELU_BACKWARD, SWIGLU_FORWARD, SWIGLU_BACKWARD, CROSS_ENTROPY,
                              LINEAR_CROSS_ENTROPY, SGD, QUANTIZE, DEQUANTIZE)}

__all__ = ["BACKENDS", "OPS", "PREFERENCE", "adagrad_step", "adam_step", "backend_usable", "bias_gelu_backward",
           "bias_gelu_forward", "cross_entropy", "dequantize_state", "grad_stats", "linear_cross_entropy",
           "norm_backward", "norm_forward", "quantize_state", "sgd_step", "step_control", "swiglu_backward",
           "swiglu_forward"]
