"""Data held as tensors in memory: embedded datasets, file readers and the in-memory loader.

``load_dataset(name, root=None)`` returns a :class:`TensorDataset`; ``prepare_dataset`` adds the
standard preprocessing (optional resize, per-channel standardization with training-set statistics,
optional subsets for quick runs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F

from ..errors import DataError
from .dataset import TensorDataset
from .embedded import cache_dir, load_digits, load_mnist1d
from .loader import Augment, InMemoryLoader, random_crop, random_flip
from .readers import load_cifar, load_mnist, read_idx

_DATASETS: dict[str, tuple[Callable[[str | None], TensorDataset], bool]] = {}


def register_dataset(name: str, loader: Callable[[str | None], TensorDataset], needs_root: bool):
    """Register ``loader(root) -> TensorDataset`` under ``name``."""
    _DATASETS[name] = (loader, needs_root)


def dataset_names() -> list[str]:
    return list(_DATASETS)


def load_dataset(name: str, root: str | None = None) -> TensorDataset:
    """Load dataset ``name``; file-based datasets read their files from ``root``."""
    try:
        loader, _ = _DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; valid choices: {', '.join(_DATASETS)}"
        ) from None
    return loader(root)


def prepare_dataset(
    dataset: TensorDataset,
    *,
    resize: int | None = None,
    standardize: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> TensorDataset:
    """Resize (bilinear, once), subset, and standardize each channel with the training statistics."""
    x_tr, y_tr, x_te, y_te = dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test
    if train_limit:
        x_tr, y_tr = x_tr[:train_limit], y_tr[:train_limit]
    if test_limit:
        x_te, y_te = x_te[:test_limit], y_te[:test_limit]
    if resize:
        spatial = x_tr.ndim - 2
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial]
        size = (resize,) * spatial
        x_tr = F.interpolate(x_tr, size=size, mode=mode, align_corners=False)
        x_te = F.interpolate(x_te, size=size, mode=mode, align_corners=False)
    if standardize:
        dims = [0] + list(range(2, x_tr.ndim))
        mean = x_tr.mean(dim=dims, keepdim=True)
        std = x_tr.std(dim=dims, keepdim=True).clamp_min(1e-8)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return TensorDataset(dataset.name, x_tr, y_tr, x_te, y_te, dataset.num_classes)


register_dataset("digits", lambda root: load_digits(), needs_root=False)
register_dataset("mnist1d", lambda root: load_mnist1d(), needs_root=False)
register_dataset("mnist", load_mnist, needs_root=True)
register_dataset("cifar10", lambda root: load_cifar("cifar10", root), needs_root=True)
register_dataset("cifar100", lambda root: load_cifar("cifar100", root), needs_root=True)

__all__ = [
    "Augment",
    "InMemoryLoader",
    "TensorDataset",
    "cache_dir",
    "dataset_names",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist1d",
    "prepare_dataset",
    "random_crop",
    "random_flip",
    "read_idx",
    "register_dataset",
]
