"""pyeff: fused kernels that make PyTorch training cheaper without changing training code.

- pyeff.optim: Adam, AdamW, Adagrad as one fused kernel per step, with loss-scale unscaling,
  overflow skip, gradient clipping and fp32 master weights inside the step;
- pyeff.amp: a GradScaler that lets those optimizers do the overflow check in their own pass;
- pyeff.memory: a caching memory pool for CPU tensors (and a CUDA pluggable one), its statistics,
  and flat parameter buffers;
- pyeff.nn: fused layers (LayerNorm, RMSNorm, bias + GELU, SwiGLU, losses that compute their
  gradient in the forward) as drop-in modules, and patch(model), which swaps them in;
- pyeff.distributed: a DDP comm hook that computes the step's gradient norm and overflow flag
  during the all-reduce;
- pyeff.ops: the op layer (contracts, references, backends).
"""

from . import _ext

__version__ = "0.1.0"

_ext.load_error()  # one warning, now, if the compiled extension is missing

from . import amp, distributed, memory, nn, ops, optim  # noqa: E402

__all__ = ["amp", "distributed", "memory", "nn", "ops", "optim", "__version__"]
