"""Mixed precision: a GradScaler that fuses its overflow check into pyeff optimizers' step."""

from .grad_scaler import GradScaler

__all__ = ["GradScaler"]
