"""The in-memory dataset every loader and model works from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TensorDataset:
    """A classification dataset held as four tensors.

    ``x_train`` is ``(N, C, *spatial)`` float32 (``(N, 1, 40)`` for 1-D data), ``y_train`` is ``(N,)``
    int64; the same for the test split. ``name`` and ``classes`` describe it for reports.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: {split} split has {x.shape[0]} inputs but {y.shape[0]} labels"
                )
            if x.ndim < 3:
                raise ValueError(
                    f"{self.name}: inputs must be (N, C, *spatial); got {tuple(x.shape)}"
                )

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The shape of one input, ``(C, *spatial)``."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"TensorDataset({self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, classes={self.num_classes})"
        )
