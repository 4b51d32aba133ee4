"""Datasets that need no files and no network: scikit-learn's digits and mnist1d."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_bytes
from .dataset import TensorDataset

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def cache_dir() -> Path:
    """Where generated data is cached: ``$NORMLAB_CACHE`` or ``~/.cache/normlab``."""
    root = os.environ.get("NORMLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "normlab"
    )
    return Path(root)


def load_digits() -> TensorDataset:
    """scikit-learn's 1797 8x8 handwritten digits (values 0..16 scaled to 0..1).

    A fixed, seeded, class-stratified split keeps 20 % for testing (1437 train / 360 test), so every
    run and every machine sees the same split.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return TensorDataset(
        "digits",
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
        10,
    )


def load_mnist1d() -> TensorDataset:
    """mnist1d (Greydanus 2020): 4000 train / 1000 test signals of length 40, 10 classes.

    Generated offline by the ``mnist1d`` package with its default arguments (seed 42) and cached
    as ``mnist1d.npz`` in :func:`cache_dir`, so it is generated only once per machine.
    """
    path = cache_dir() / "mnist1d.npz"
    arrays = _read_cached(path)
    if arrays is None:
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())
        arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
        path.parent.mkdir(parents=True, exist_ok=True)
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
    return TensorDataset(
        "mnist1d",
        torch.from_numpy(arrays["x"].astype(np.float32))[:, None],
        torch.from_numpy(arrays["y"].astype(np.int64)),
        torch.from_numpy(arrays["x_test"].astype(np.float32))[:, None],
        torch.from_numpy(arrays["y_test"].astype(np.int64)),
        10,
    )


def _read_cached(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    except Exception:
        # A damaged cache is regenerated rather than trusted.
        return None
    if arrays["x"].shape != (4000, 40) or arrays["x_test"].shape != (1000, 40):
        return None
    return arrays
