"""Functional forms of the fused layers (the counterparts of torch.nn.functional)."""

from .activation import bias_gelu, swiglu
from .loss import cross_entropy, linear_cross_entropy
from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["add_layer_norm", "add_rms_norm", "bias_gelu", "cross_entropy", "layer_norm", "linear_cross_entropy",
           "rms_norm", "swiglu"]
