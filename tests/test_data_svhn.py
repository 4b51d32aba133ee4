"""SVHN from .mat files written in the real format (MATLAB v5 via scipy.io.savemat)."""

import numpy as np
import pytest
import torch

from normlab.data import load_dataset, load_svhn, prepare_dataset
from normlab.errors import DataError

scipy_io = pytest.importorskip("scipy.io")


def svhn_arrays(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0] = 10  # the digit 0 is stored as 10
    return x, y


def write_svhn(folder, sizes=(("train", 9), ("test", 4), ("extra", 5))):
    arrays = {}
    for seed, (part, n) in enumerate(sizes):
        x, y = svhn_arrays(n, seed)
        scipy_io.savemat(folder / f"{part}_32x32.mat", {"X": x, "y": y})
        arrays[part] = (x, y)
    return arrays


def test_reads_the_real_layout(tmp_path):
    arrays = write_svhn(tmp_path)
    ds = load_dataset("svhn", str(tmp_path))
    assert ds.name == "svhn" and ds.num_classes == 10
    assert ds.x_train.shape == (9, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    x, y = arrays["train"]
    # image n, channel c, row i, column j is X[i, j, c, n]
    for n, c, i, j in [(0, 0, 0, 0), (3, 2, 31, 5), (8, 1, 7, 30)]:
        assert ds.x_train[n, c, i, j].item() == pytest.approx(x[i, j, c, n] / 255.0)
    assert ds.y_train[0].item() == 0  # label 10 is the digit 0
    assert ds.y_train.tolist() == [int(v) % 10 for v in y[:, 0]]
    assert ds.y_test.tolist() == [int(v) % 10 for v in arrays["test"][1][:, 0]]


def test_extra_is_appended_to_train(tmp_path):
    arrays = write_svhn(tmp_path)
    ds = load_dataset("svhn", str(tmp_path), {"svhn_extra": True})
    assert ds.x_train.shape[0] == 9 + 5
    extra_x = torch.from_numpy(arrays["extra"][0].transpose(3, 2, 0, 1).astype(np.float32)) / 255
    torch.testing.assert_close(ds.x_train[9:], extra_x)
    (tmp_path / "extra_32x32.mat").unlink()
    with pytest.raises(DataError, match=r"extra_32x32\.mat not found.*svhn_extra=true"):
        load_svhn(tmp_path, extra=True)
    assert load_svhn(tmp_path).x_train.shape[0] == 9  # not needed without the option


def test_per_channel_standardization(tmp_path):
    write_svhn(tmp_path, (("train", 40), ("test", 4)))
    ds = prepare_dataset(load_svhn(tmp_path))
    mean = ds.x_train.mean(dim=(0, 2, 3))
    std = ds.x_train.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-4, rtol=0)


def test_missing_file(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(DataError, match=r"test_32x32\.mat not found.*ufldl"):
        load_svhn(tmp_path)
    with pytest.raises(DataError, match="data.root"):
        load_dataset("svhn", None)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"images": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))}, r"lacks .*'X'"),
        ({"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))}, r"X has shape"),
        ({"X": np.zeros((32, 32, 3, 2)), "y": np.ones((2, 1))}, "expected uint8"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))}, "y has shape"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]])}, "label 11"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [1]])}, "label 0 at"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1.5], [1]])}, "integer"),
    ],
)
def test_malformed_file(tmp_path, content, message):
    write_svhn(tmp_path)
    scipy_io.savemat(tmp_path / "train_32x32.mat", content)
    with pytest.raises(DataError, match=r"train_32x32\.mat: .*" + message):
        load_svhn(tmp_path)


def test_damaged_and_unreadable_files(tmp_path):
    write_svhn(tmp_path)
    path = tmp_path / "train_32x32.mat"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"train_32x32\.mat: .*download it again"):
        load_svhn(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"train_32x32\.mat"):
        load_svhn(tmp_path)
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 600)  # HDF5, as MATLAB v7.3 writes
    with pytest.raises(DataError, match=r"train_32x32\.mat"):
        load_svhn(tmp_path)
    path.unlink()
    path.mkdir()
    with pytest.raises(DataError, match=r"train_32x32\.mat: is a directory"):
        load_svhn(tmp_path)
