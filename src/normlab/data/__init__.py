"""Data held as tensors in memory: embedded datasets, file readers and the in-memory loader.

``load_dataset(name, root=None, options=None)`` returns a :class:`TensorDataset`; ``prepare_dataset``
adds the standard preprocessing (optional resize, per-channel standardization with training-set
statistics, optional subsets for quick runs). Whatever a loader returns is checked: every label must
be one of the dataset's classes, so a bad label is an error at load, not a crash mid-training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch.nn.functional as F

from ..errors import DataError
from .dataset import TensorDataset
from .embedded import cache_dir, load_digits, load_mnist1d
from .loader import Augment, InMemoryLoader, random_crop, random_flip
from .readers import load_cifar, load_mnist, load_svhn, read_idx, read_svhn_mat

_DATASETS: dict[str, tuple[Callable[..., TensorDataset], bool, tuple[str, ...]]] = {}


def register_dataset(
    name: str,
    loader: Callable[..., TensorDataset],
    needs_root: bool,
    options: tuple[str, ...] = (),
):
    """Register ``loader(root, **opts) -> TensorDataset`` under ``name``.

    ``options`` names the ``data.*`` keys the loader takes as keyword arguments (``svhn_extra``).
    """
    _DATASETS[name] = (loader, needs_root, tuple(options))


def dataset_names() -> list[str]:
    return list(_DATASETS)


def dataset_options(name: str) -> tuple[str, ...]:
    """The ``data.*`` keys dataset ``name`` takes besides ``root``."""
    return _DATASETS[name][2]


def load_dataset(
    name: str, root: str | None = None, options: Mapping[str, object] | None = None
) -> TensorDataset:
    """Load dataset ``name``; file-based datasets read their files from ``root``.

    ``options`` (the ``data`` config section, say) supplies the keys the dataset declared; a
    dataset-specific key set for another dataset (``data.svhn_extra=true`` with ``data=mnist``)
    is an error rather than silently ignored.
    """
    try:
        loader, _, own = _DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; valid choices: {', '.join(_DATASETS)}"
        ) from None
    options = dict(options or {})
    for other, (_, _, keys) in _DATASETS.items():
        for key in keys:
            if key not in own and options.get(key):
                raise DataError(
                    f"data.{key} applies to data={other} only, not data={name}; remove it"
                )
    dataset = loader(root, **{k: options[k] for k in own if k in options})
    _check_labels(dataset)
    return dataset


def _check_labels(dataset: TensorDataset) -> None:
    for split in ("train", "test"):
        y = getattr(dataset, f"y_{split}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= dataset.num_classes):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise DataError(
                f"{dataset.name}: {split} label {bad} is outside its classes "
                f"0..{dataset.num_classes - 1}; the data files are damaged or not {dataset.name}"
            )


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
register_dataset(
    "svhn", lambda root, svhn_extra=False: load_svhn(root, extra=svhn_extra), True, ("svhn_extra",)
)

__all__ = [
    "Augment",
    "InMemoryLoader",
    "TensorDataset",
    "cache_dir",
    "dataset_names",
    "dataset_options",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist1d",
    "load_svhn",
    "prepare_dataset",
    "random_crop",
    "random_flip",
    "read_idx",
    "read_svhn_mat",
    "register_dataset",
]
