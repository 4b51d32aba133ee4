"""Optimizers for scale-invariant weights: SGD-G and Adam-G (Cho & Lee 2017) on G(1,n), and
SphereSGD (Kodryan et al. 2022) at a fixed effective learning rate."""

from .adamg import AdamG
from .sgdg import SGDG
from .sphere import SphereSGD

__all__ = ["SGDG", "AdamG", "SphereSGD"]
