"""Readers for the dataset files a user downloads: MNIST (IDX) and CIFAR-10/100 (python pickles).

normlab never downloads: point ``data.root`` at the files you have.

* MNIST: the four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``), in
  ``root`` or ``root/MNIST/raw`` (torchvision's layout).
* CIFAR-10: the "python version" archive ``cifar-10-python.tar.gz`` or its extracted folder
  ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``); ``root`` may be the archive, the
  folder, or a directory holding either.
* CIFAR-100: ``cifar-100-python.tar.gz`` or the folder ``cifar-100-python`` (``train``, ``test``),
  with the 100 fine labels.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import TensorDataset

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
CIFAR_HELP = {
    "cifar10": "download the CIFAR-10 python version (cifar-10-python.tar.gz) and pass the archive "
    "or its extracted folder cifar-10-batches-py as data.root",
    "cifar100": "download the CIFAR-100 python version (cifar-100-python.tar.gz) and pass the "
    "archive or its extracted folder cifar-100-python as data.root",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------------------- MNIST
def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array of its stored shape.

    The format: two zero bytes, a type code, the number of dimensions, then that many big-endian
    uint32 sizes and the data.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read the gzip file ({exc}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an IDX file (expected a header 00 00 <type> <ndim>, "
            f"got {raw[:4].hex(' ') or 'an empty file'}); download it again"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes of data) but the file "
            f"holds {len(raw) - header}; the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_mnist_file(root: Path, stem: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"MNIST file {stem}[.gz] not found in {root}; {MNIST_HELP}")


def load_mnist(root: str | Path) -> TensorDataset:
    """MNIST from its IDX files: 60000/10000 images of 28x28 scaled to [0, 1]."""
    root = _existing_root(root, "mnist", MNIST_HELP)
    arrays = {key: read_idx(_find_mnist_file(root, stem)) for key, stem in MNIST_FILES.items()}
    for key in ("x_train", "x_test"):
        if arrays[key].ndim != 3:
            raise DataError(
                f"MNIST {MNIST_FILES[key]}: expected images (N, 28, 28), got {arrays[key].shape}"
            )
    for key in ("y_train", "y_test"):
        if arrays[key].ndim != 1:
            raise DataError(
                f"MNIST {MNIST_FILES[key]}: expected labels (N,), got {arrays[key].shape}"
            )
    return TensorDataset(
        "mnist",
        torch.from_numpy(arrays["x_train"].astype(np.float32) / 255.0)[:, None],
        torch.from_numpy(arrays["y_train"].astype(np.int64)),
        torch.from_numpy(arrays["x_test"].astype(np.float32) / 255.0)[:, None],
        torch.from_numpy(arrays["y_test"].astype(np.int64)),
        10,
    )


# ----------------------------------------------------------------------------------------- CIFAR
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


def _unpickle_batch(data: bytes, where: str, labels_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{where}: not a readable CIFAR python pickle ({exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or labels_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{where}: expected a dict with b'data' and {labels_key!r}, found {keys}")
    x = np.asarray(batch[b"data"], dtype=np.uint8)
    y = np.asarray(batch[labels_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != y.shape[0]:
        raise DataError(
            f"{where}: expected data (N, 3072) and N labels, got {x.shape} and {y.shape}"
        )
    return x, y


def _cifar_members(root: Path, spec: dict, help_text: str) -> dict[str, bytes]:
    """The raw bytes of each batch file, from the folder or from the .tar.gz archive."""
    names = spec["train"] + spec["test"]
    archive = None
    if root.is_file():
        archive = root
    else:
        for folder in (root, root / spec["folder"]):
            if all((folder / n).is_file() for n in names):
                return {n: (folder / n).read_bytes() for n in names}
        if (root / spec["archive"]).is_file():
            archive = root / spec["archive"]
    if archive is None:
        raise DataError(
            f"no {spec['folder']}/ folder or {spec['archive']} found at {root}; {help_text}"
        )
    try:
        with tarfile.open(archive, "r:*") as tar:
            found = {}
            for member in tar.getmembers():
                base = Path(member.name).name
                if member.isfile() and base in names:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive}: cannot read the archive ({exc}); {help_text}") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"{archive}: the archive lacks {missing}; {help_text}")
    return found


def load_cifar(name: str, root: str | Path) -> TensorDataset:
    """CIFAR-10 or CIFAR-100 (``name``) from the python-version files, scaled to [0, 1]."""
    spec = _CIFAR[name]
    help_text = CIFAR_HELP[name]
    root = _existing_root(root, name, help_text)
    members = _cifar_members(root, spec, help_text)
    splits = {}
    for split in ("train", "test"):
        parts = [_unpickle_batch(members[n], f"{root}:{n}", spec["labels"]) for n in spec[split]]
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([p[1] for p in parts])
        if y.min() < 0 or y.max() >= spec["classes"]:
            raise DataError(f"{root}: {split} labels outside 0..{spec['classes'] - 1}")
        splits[split] = (torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y))
    return TensorDataset(name, *splits["train"], *splits["test"], spec["classes"])


def _existing_root(root, name: str, help_text: str) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"data={name} needs data.root=PATH; {help_text}")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root={path} does not exist; {help_text}")
    return path
