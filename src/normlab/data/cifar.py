"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the "python version" files.

* CIFAR-10: the archive ``cifar-10-python.tar.gz`` or its extracted folder ``cifar-10-batches-py``
  (``data_batch_1..5``, ``test_batch``); ``root`` may be the archive, the folder, or a directory
  holding either.
* CIFAR-100: ``cifar-100-python.tar.gz`` or the folder ``cifar-100-python`` (``train``, ``test``),
  with the 100 fine labels.

Each batch is a pickled dict: ``b"data"`` a (N, 3072) uint8 array (the red, green and blue 32x32
planes of each image, row-major) and the labels a list of N ints. Decoded arrays are cached (see
:mod:`normlab.data.cache`), so only the first load pays for inflating and unpickling.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .cache import cached_decode
from .dataset import TensorDataset
from .files import existing_root, read_bytes, read_tar_members, unit_float

CIFAR_HELP = {
    "cifar10": "download the CIFAR-10 python version (cifar-10-python.tar.gz) and pass the archive "
    "or its extracted folder cifar-10-batches-py as data.root",
    "cifar100": "download the CIFAR-100 python version (cifar-100-python.tar.gz) and pass the "
    "archive or its extracted folder cifar-100-python as data.root",
}
_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": b"labels",
        "classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "labels": b"fine_labels",
        "classes": 100,
    },
}
IMAGE_SHAPE = (3, 32, 32)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (dicts, lists, bytes, numpy arrays), so a crafted
    pickle cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _unpickle_batch(
    data: bytes, where: str, labels_key: bytes, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One batch as (N, 3, 32, 32) uint8 images and (N,) int64 labels in 0..classes-1."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise DataError(
            f"{where}: not a readable CIFAR python pickle ({exc}); download it again"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or labels_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{where}: expected a dict with b'data' and {labels_key!r}, found {keys}")
    x, y = np.asarray(batch[b"data"]), np.asarray(batch[labels_key])
    if x.dtype != np.uint8:
        raise DataError(f"{where}: expected uint8 pixels, got {x.dtype}; download it again")
    if x.ndim != 2 or x.shape[1] != int(np.prod(IMAGE_SHAPE)) or y.shape != (x.shape[0],):
        raise DataError(
            f"{where}: expected data (N, 3072) (3x32x32 images) and N labels, got {x.shape} and "
            f"{y.shape}; download it again"
        )
    if y.size and y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got {y.dtype}; download it again")
    bad = np.flatnonzero((y < 0) | (y >= classes))
    if bad.size:
        raise DataError(
            f"{where}: label {int(y[bad[0]])} at index {int(bad[0])} is outside "
            f"0..{classes - 1} ({bad.size} such labels); download it again"
        )
    return x.reshape(-1, *IMAGE_SHAPE), y.astype(np.int64)


def _locate(root: Path, spec: dict, help_text: str) -> tuple[str, Path]:
    """``("archive", path)`` or ``("folder", path)``: where the batches are read from."""
    names = spec["train"] + spec["test"]
    if root.is_file():
        return "archive", root
    folders = [root, root / spec["folder"]]
    for folder in folders:
        if all((folder / n).exists() for n in names):
            return "folder", folder
    if (root / spec["archive"]).exists():
        return "archive", root / spec["archive"]
    for folder in folders:
        present = [n for n in names if (folder / n).exists()]
        if present or (folder.name == spec["folder"] and folder.is_dir()):
            missing = [n for n in names if n not in present]
            raise DataError(
                f"{folder} lacks {', '.join(missing)} (and there is no {spec['archive']} in "
                f"{root}); extract the archive again, or {help_text}"
            )
    raise DataError(
        f"no {spec['folder']}/ folder or {spec['archive']} found at {root}; {help_text}"
    )


def _decode(name: str, kind: str, where: Path) -> dict[str, np.ndarray]:
    spec, help_text = _CIFAR[name], CIFAR_HELP[name]
    names = spec["train"] + spec["test"]
    if kind == "archive":
        members = read_tar_members(where, names, help_text)
        missing = [n for n in names if n not in members]
        if missing:
            raise DataError(f"{where}: the archive lacks {', '.join(missing)}; {help_text}")
        label = lambda n: f"{where}:{n}"  # noqa: E731
    else:
        members = {n: read_bytes(where / n) for n in names}
        label = lambda n: str(where / n)  # noqa: E731
    arrays = {}
    for split in ("train", "test"):
        parts = [
            _unpickle_batch(members.pop(n), label(n), spec["labels"], spec["classes"])
            for n in spec[split]
        ]
        arrays[f"x_{split}"] = np.concatenate([p[0] for p in parts])
        arrays[f"y_{split}"] = np.concatenate([p[1] for p in parts])
    return arrays


def _valid(arrays: dict[str, np.ndarray], classes: int) -> bool:
    """A cheap re-check of a cache entry: the shapes, types and label range decoding guarantees."""
    try:
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.dtype != np.uint8 or x.shape[1:] != IMAGE_SHAPE or y.shape != x.shape[:1]:
                return False
            if y.dtype != np.int64 or (y.size and (y.min() < 0 or y.max() >= classes)):
                return False
    except KeyError:
        return False
    return True


def load_cifar(name: str, root: str | Path) -> TensorDataset:
    """CIFAR-10 or CIFAR-100 (``name``) from the python-version files, scaled to [0, 1]."""
    spec, help_text = _CIFAR[name], CIFAR_HELP[name]
    root = existing_root(root, name, help_text)
    kind, where = _locate(root, spec, help_text)
    sources = [where] if kind == "archive" else [where / n for n in spec["train"] + spec["test"]]
    arrays = cached_decode(
        name,
        sources,
        lambda: _decode(name, kind, where),
        lambda a: _valid(a, spec["classes"]),
    )
    return TensorDataset(
        name,
        unit_float(arrays["x_train"]),
        torch.from_numpy(arrays["y_train"]),
        unit_float(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"]),
        spec["classes"],
    )
