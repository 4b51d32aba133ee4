"""The MNIST reader on the real files, checked against an independent parse written here.

The files are looked for in ``$NORMLAB_TEST_DATA`` (a folder holding them, or holding ``mnist/``)
and in ``<repo>/../shared/data/mnist``; the tests are skipped, with the reason, when they are absent.
The shared copy holds the first 19690 training images (and all 10000 test images).
"""

import gzip
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import normlab
from normlab.data import load_mnist

STEMS = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
REPO = Path(__file__).resolve().parents[1]


def _has_mnist(folder: Path) -> bool:
    return all(
        (folder / stem).is_file() or (folder / (stem + ".gz")).is_file() for stem in STEMS.values()
    )


def find_mnist() -> tuple[Path | None, str]:
    looked = []
    env = os.environ.get("NORMLAB_TEST_DATA")
    candidates = [Path(env), Path(env) / "mnist"] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "mnist")
    for folder in candidates:
        if _has_mnist(folder):
            return folder, ""
        looked.append(str(folder))
    return None, "real MNIST files not found in " + ", ".join(looked) + " (set NORMLAB_TEST_DATA)"


@pytest.fixture(scope="module")
def mnist_root():
    root, reason = find_mnist()
    if root is None:
        print(reason)
        pytest.skip(reason)
    return root


def parse_idx_independently(path: Path) -> np.ndarray:
    """gzip + struct: magic 0x00000803 (images, 3 dims) or 0x00000801 (labels), big-endian sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 0x803:
        rows, cols = struct.unpack(">II", raw[8:16])
        return np.frombuffer(raw[16:], np.uint8).reshape(count, rows, cols)
    assert magic == 0x801
    return np.frombuffer(raw[8:], np.uint8).reshape(count)


@pytest.fixture(scope="module")
def reference(mnist_root):
    out = {}
    for key, stem in STEMS.items():
        path = mnist_root / stem
        out[key] = parse_idx_independently(path if path.is_file() else path.with_name(stem + ".gz"))
    return out


@pytest.fixture(scope="module")
def mnist(mnist_root):
    return load_mnist(mnist_root)


def test_sizes_dtypes_and_shapes(mnist):
    assert mnist.x_train.shape == (19690, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_train.shape == (19690,) and mnist.y_test.shape == (10000,)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.num_classes == 10
    assert 0.0 == mnist.x_train.min().item() and mnist.x_train.max().item() == 1.0


def test_labels_and_pixels_agree_with_an_independent_parse(mnist, reference):
    for split in ("train", "test"):
        y = getattr(mnist, f"y_{split}").numpy()
        ref_y = reference[f"y_{split}"]
        assert np.array_equal(y, ref_y)
        assert np.array_equal(np.bincount(y, minlength=10), np.bincount(ref_y, minlength=10))
        assert np.bincount(ref_y, minlength=10).min() > 0.07 * len(ref_y)  # every digit present
        x = getattr(mnist, f"x_{split}")[:, 0].numpy()
        assert np.array_equal(np.rint(x * 255).astype(np.uint8), reference[f"x_{split}"])
    # The test split is the standard one: its published class counts.
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(reference["y_test"], minlength=10).tolist() == counts


@pytest.mark.slow
def test_lenet_learns_mnist_in_one_epoch(mnist_root, tmp_path):
    start = time.perf_counter()
    summary = normlab.train(
        {
            "data": {"name": "mnist", "root": str(mnist_root)},
            "model": {"name": "lenet", "norm": "bn"},
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
            "epochs": 1,
            "batch_size": 128,
            "out": str(tmp_path),
            "progress": False,
            "checkpoint": False,
            "threads": 2,
        }
    )
    seconds = time.perf_counter() - start
    accuracy = summary["final"]["test_acc"]
    print(f"lenet, 1 epoch on {mnist_root}: test accuracy {accuracy:.4f} in {seconds:.1f} s")
    assert accuracy > 0.97
