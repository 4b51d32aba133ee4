"""Optimizers for scale-invariant weights (SGD-G, Adam-G, SphereSGD)."""

from .adamg import AdamG
from .sgdg import SGDG
from .sphere import SphereSGD
