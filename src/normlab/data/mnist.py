"""MNIST from its IDX files (LeCun et al. 1998): 28x28 uint8 images and labels 0..9.

The four files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``), are looked for in ``root``,
``root/MNIST/raw`` (torchvision's layout) and ``root/raw``.

Which file is used when several candidates exist: the candidates of one file are tried in that folder
order, uncompressed before ``.gz`` within a folder, and the first one that reads as a valid file of
its kind (an IDX file of the right type, shape and label range) is used; each candidate skipped
because it is bad is reported with a warning. If no candidate is valid, the error names every one
and what is wrong with it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import TensorDataset
from .files import GZIP_MAGIC, REDOWNLOAD, existing_root, gunzip, read_bytes

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MNIST_HELP = (
    "download the four MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) and pass their folder as data.root"
)
MNIST_SIZE = (28, 28)
MNIST_CLASSES = 10
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped when its name ends in ``.gz``) into an array of its stored shape.

    The format: two zero bytes, a type code, the number of dimensions, then that many big-endian
    uint32 sizes and the data, exactly ``prod(sizes) * itemsize`` bytes of it.
    """
    path = Path(path)
    raw = read_bytes(path, REDOWNLOAD)
    if path.suffix == ".gz":
        if raw[:2] != GZIP_MAGIC:
            hint = (
                "it looks like an uncompressed IDX file: remove the .gz suffix from its name"
                if _idx_header_ok(raw)
                else REDOWNLOAD
            )
            raise DataError(f"{path}: not a gzip file although named .gz; {hint}")
        raw = gunzip(raw, path)
    elif raw[:2] == GZIP_MAGIC:
        raise DataError(
            f"{path}: this file is gzip-compressed; name it {path.name}.gz or decompress it "
            f"(mv {path.name} {path.name}.gz && gunzip {path.name}.gz)"
        )
    if not _idx_header_ok(raw):
        raise DataError(
            f"{path}: not an IDX file (expected a header 00 00 <type> <ndim>, "
            f"got {raw[:4].hex(' ') or 'an empty file'}); {REDOWNLOAD}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; {REDOWNLOAD}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes of data) but the file "
            f"holds {len(raw) - header}; the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_header_ok(raw: bytes) -> bool:
    return len(raw) >= 4 and raw[0] == 0 and raw[1] == 0 and raw[2] in _IDX_DTYPES


def _read_part(key: str, path: Path) -> np.ndarray:
    """One MNIST file, checked for what it must hold: uint8 28x28 images or uint8 labels 0..9."""
    array = read_idx(path)
    if array.dtype != np.uint8:
        raise DataError(
            f"{path}: IDX data of type {array.dtype}, MNIST stores unsigned bytes (type 0x08); "
            f"{REDOWNLOAD}"
        )
    if key.startswith("x"):
        if array.ndim != 3 or array.shape[1:] != MNIST_SIZE:
            raise DataError(
                f"{path}: expected MNIST images (N, 28, 28), got {array.shape}; this is not the "
                f"MNIST {MNIST_FILES[key]} file, {MNIST_HELP}"
            )
    else:
        if array.ndim != 1:
            raise DataError(
                f"{path}: expected labels (N,), got {array.shape}; this is not the MNIST "
                f"{MNIST_FILES[key]} file, {MNIST_HELP}"
            )
        bad = np.flatnonzero(array >= MNIST_CLASSES)
        if bad.size:
            raise DataError(
                f"{path}: label {int(array[bad[0]])} at index {int(bad[0])} is outside 0..9 "
                f"({bad.size} such labels); {REDOWNLOAD}"
            )
    return array


def _candidates(root: Path, stem: str) -> list[Path]:
    found = []
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            path = folder / name
            if path.exists() or path.is_symlink():  # a dangling link is reported, not skipped
                found.append(path)
    return found


def _load_part(root: Path, key: str) -> tuple[np.ndarray, Path]:
    stem = MNIST_FILES[key]
    candidates = _candidates(root, stem)
    if not candidates:
        raise DataError(f"MNIST file {stem}[.gz] not found in {root}; {MNIST_HELP}")
    errors = []
    for path in candidates:
        try:
            array = _read_part(key, path)
        except DataError as exc:
            errors.append(str(exc))
            continue
        for message in errors:
            warnings.warn(
                f"normlab: skipping a bad MNIST file, using {path}: {message}", stacklevel=3
            )
        return array, path
    if len(errors) == 1:
        raise DataError(errors[0])
    raise DataError(f"no usable {stem} in {root}: " + " | ".join(errors))


def load_mnist(root: str | Path) -> TensorDataset:
    """MNIST from its IDX files: 60000/10000 images of 28x28 scaled to [0, 1]."""
    root = existing_root(root, "mnist", MNIST_HELP)
    arrays, paths = {}, {}
    for key in MNIST_FILES:
        arrays[key], paths[key] = _load_part(root, key)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{paths[f'x_{split}']} holds {x.shape[0]} images but {paths[f'y_{split}']} holds "
                f"{y.shape[0]} labels; one of them is truncated or from another download, "
                "download both again"
            )
    return TensorDataset(
        "mnist",
        torch.from_numpy(arrays["x_train"].astype(np.float32) / 255.0)[:, None],
        torch.from_numpy(arrays["y_train"].astype(np.int64)),
        torch.from_numpy(arrays["x_test"].astype(np.float32) / 255.0)[:, None],
        torch.from_numpy(arrays["y_test"].astype(np.int64)),
        MNIST_CLASSES,
    )
