"""SVHN (Netzer et al. 2011), the cropped-digits format: ``train_32x32.mat``, ``test_32x32.mat``
and optionally ``extra_32x32.mat`` (``data.svhn_extra=true`` appends it to the training split, the
setting of most SVHN papers: 73257 + 531131 train, 26032 test images).

Each file is a MATLAB v5 ``.mat`` file with ``X``, a (32, 32, 3, N) uint8 array (height, width,
RGB, image), and ``y``, (N, 1) labels 1..10 where 10 stands for the digit 0; normlab stores the digit
itself (label 10 becomes 0), so class k is the digit k. scipy reads the files; it is imported only
when SVHN is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import TensorDataset
from .files import existing_root, open_binary, unit_float

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
SVHN_HELP = (
    "download train_32x32.mat and test_32x32.mat (and extra_32x32.mat for data.svhn_extra=true) "
    "from http://ufldl.stanford.edu/housenumbers/ and pass their folder as data.root"
)
SVHN_CLASSES = 10


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN file as (N, 3, 32, 32) uint8 images and (N,) int64 digits 0..9."""
    import scipy.io

    with open_binary(path, SVHN_HELP) as f:
        try:
            mat = scipy.io.loadmat(f, variable_names=["X", "y"])
        except NotImplementedError as exc:  # scipy's answer to a v7.3 (HDF5) file
            raise DataError(
                f"{path}: cannot read this .mat file ({exc}); SVHN's files are MATLAB v5, "
                f"download it again (or re-save it in MATLAB with save(..., '-v7'))"
            ) from None
        except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, zlib.error...
            raise DataError(
                f"{path}: not a readable MATLAB .mat file ({exc or type(exc).__name__}); "
                "the file is damaged, download it again"
            ) from None
    missing = [k for k in ("X", "y") if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(
            f"{path}: lacks the variable(s) {missing} (found {found}); this is not an SVHN "
            f"cropped-digits file, {SVHN_HELP}"
        )
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(
            f"{path}: X has shape {x.shape}, expected (32, 32, 3, N) (SVHN's cropped digits); "
            f"{SVHN_HELP}"
        )
    if x.dtype != np.uint8:
        raise DataError(f"{path}: X is {x.dtype}, expected uint8 pixels; {SVHN_HELP}")
    n = x.shape[3]
    if y.size != n or (y.ndim == 2 and 1 not in y.shape) or y.ndim > 2:
        raise DataError(f"{path}: y has shape {y.shape}, expected ({n}, 1) for {n} images")
    y = y.reshape(-1)
    if y.dtype.kind not in "iuf" or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise DataError(f"{path}: y holds {y.dtype} values, expected integer labels 1..10")
    bad = np.flatnonzero((y < 1) | (y > 10))
    if bad.size:
        raise DataError(
            f"{path}: label {y[bad[0]]:g} at index {int(bad[0])} is outside 1..10 "
            f"({bad.size} such labels); download it again"
        )
    # (H, W, C, N) -> (N, C, H, W); a contiguous copy so later float conversion is one pass.
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return images, (y.astype(np.int64) % 10)


def load_svhn(root: str | Path, extra: bool = False) -> TensorDataset:
    """SVHN train/test (``extra=True`` appends ``extra_32x32.mat`` to train), pixels in [0, 1]."""
    root = existing_root(root, "svhn", SVHN_HELP)
    folder = root.parent if root.is_file() else root
    parts = ["train", "extra", "test"] if extra else ["train", "test"]
    paths = {}
    for part in parts:
        paths[part] = folder / SVHN_FILES[part]
        if not (paths[part].exists() or paths[part].is_symlink()):
            what = " (data.svhn_extra=true needs it)" if part == "extra" else ""
            raise DataError(
                f"SVHN file {SVHN_FILES[part]} not found in {folder}{what}; {SVHN_HELP}"
            )
    arrays = {part: read_svhn_mat(path) for part, path in paths.items()}
    train = [arrays[p] for p in parts if p != "test"]
    x_train = train[0][0] if len(train) == 1 else np.concatenate([t[0] for t in train])
    y_train = train[0][1] if len(train) == 1 else np.concatenate([t[1] for t in train])
    return TensorDataset(
        "svhn",
        unit_float(x_train),
        torch.from_numpy(y_train),
        unit_float(arrays["test"][0]),
        torch.from_numpy(arrays["test"][1]),
        SVHN_CLASSES,
    )
