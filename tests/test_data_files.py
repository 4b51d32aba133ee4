"""Damaged, wrong or unreadable data files are a DataError naming the file, never wrong data
(issue 9). Each test builds the damaged file itself and checks the reader refuses it."""

import gzip
import importlib.util
import io
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.cli import main
from normlab.data import load_cifar, load_dataset, load_mnist, read_idx, register_dataset
from normlab.data.dataset import TensorDataset
from normlab.errors import DataError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_fake_cifar.py"
_spec = importlib.util.spec_from_file_location("make_fake_cifar", SCRIPT)
fake_cifar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_cifar)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


MNIST_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def mnist_arrays(n_train=12, n_test=5, size=28):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, size, size)),
        "y_train": rng.integers(0, 10, n_train),
        "x_test": rng.integers(0, 256, (n_test, size, size)),
        "y_test": rng.integers(0, 10, n_test),
    }


def write_mnist(folder, arrays=None, gz=True):
    arrays = arrays or mnist_arrays()
    for key, array in arrays.items():
        data = idx_bytes(array)
        name = MNIST_NAMES[key] + (".gz" if gz else "")
        (folder / name).write_bytes(gzip.compress(data) if gz else data)
    return arrays


# ------------------------------------------------------------------------------ gzip integrity
def test_idx_gz_with_corrupt_deflate_is_a_data_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    packed = bytearray(gzip.compress(idx_bytes(np.zeros((4, 28, 28)))))
    packed[10] = 0x07  # first deflate block header: BFINAL=1, BTYPE=11 (reserved): zlib.error
    path.write_bytes(bytes(packed))
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(packed))  # what the reader used to leak
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: corrupt gzip.*download"):
        read_idx(path)


def test_idx_gz_truncated_and_bad_crc(tmp_path):
    packed = gzip.compress(idx_bytes(np.arange(784).reshape(1, 28, 28) % 256))
    short = tmp_path / "short.gz"
    short.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=r"short\.gz.*truncated"):
        read_idx(short)
    crc = bytearray(packed)
    crc[-8] ^= 0xFF  # the CRC-32 in the trailer
    bad = tmp_path / "crc.gz"
    bad.write_bytes(bytes(crc))
    with pytest.raises(DataError, match=r"crc\.gz.*CRC"):
        read_idx(bad)


def _tar_gz_stored(members: dict[str, bytes]) -> bytes:
    """A .tar.gz with stored (uncompressed) deflate blocks: the pixels appear verbatim inside."""
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(tar_buffer.getvalue(), compresslevel=0)


def test_cifar_tar_gz_with_a_bad_crc_is_refused(tmp_path):
    batches = fake_cifar.fake_batches(20, 5)
    members = {name: fake_cifar.py2_pickle(b) for name, b in batches.items()}
    good = _tar_gz_stored(members)
    (tmp_path / "good.tar.gz").write_bytes(good)
    ds = load_cifar("cifar10", tmp_path / "good.tar.gz")
    first = batches["data_batch_1"]["data"][0]
    assert ds.x_train[0].flatten().mul(255).round().to(torch.uint8).tolist() == first.tolist()
    # Flip one pixel byte inside the (stored, so still inflatable) data: only the CRC can tell.
    damaged = bytearray(good)
    at = bytes(good).index(first[:64].tobytes()) + 10
    damaged[at] ^= 0x01
    (tmp_path / "bad.tar.gz").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"bad\.tar\.gz.*(CRC|crc)"):
        load_cifar("cifar10", tmp_path / "bad.tar.gz")
    # The same for the CRC trailer itself of a normally compressed archive.
    archive, _ = fake_cifar.write_fake_cifar10(tmp_path / "x", 20, 5)
    trailer = bytearray(archive.read_bytes())
    trailer[-8] ^= 0xFF
    archive.write_bytes(bytes(trailer))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_cifar("cifar10", archive)


def test_cifar_truncated_archive(tmp_path):
    archive, _ = fake_cifar.write_fake_cifar10(tmp_path, 20, 5)
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz.*download"):
        load_cifar("cifar10", tmp_path)


# ------------------------------------------------------------------------------ what is missing
def test_cifar_folder_missing_a_batch_names_it(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in fake_cifar.fake_batches(20, 5).items():
        (folder / name).write_bytes(fake_cifar.py2_pickle(batch))
    (folder / "data_batch_3").unlink()
    for root in (tmp_path, folder):
        with pytest.raises(DataError, match=r"cifar-10-batches-py lacks data_batch_3 "):
            load_cifar("cifar10", root)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3, test_batch"):
        load_cifar("cifar10", tmp_path)


def test_cifar_archive_missing_a_batch_names_it(tmp_path):
    batches = fake_cifar.fake_batches(20, 5)
    del batches["data_batch_4"]
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(_tar_gz_stored({n: fake_cifar.py2_pickle(b) for n, b in batches.items()}))
    with pytest.raises(DataError, match="archive lacks data_batch_4"):
        load_cifar("cifar10", tmp_path)


# ------------------------------------------------------------------------------ which file wins
def test_empty_uncompressed_idx_beside_a_good_gz_uses_the_gz(tmp_path):
    arrays = write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")  # a failed extraction
    with pytest.warns(UserWarning, match=r"using .*train-images-idx3-ubyte\.gz.*empty file"):
        ds = load_mnist(tmp_path)
    expected = torch.from_numpy(arrays["x_train"].astype(np.float32) / 255)
    torch.testing.assert_close(ds.x_train[:, 0], expected)


def test_good_uncompressed_idx_is_preferred_and_both_bad_names_both(tmp_path):
    arrays = write_mnist(tmp_path)
    other = mnist_arrays(n_train=12)
    other["y_train"] = (other["y_train"] + 1) % 10
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(other["y_train"]))
    assert load_mnist(tmp_path).y_train.tolist() == other["y_train"].tolist()
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00junk")
    with pytest.raises(DataError) as exc:
        load_mnist(tmp_path)
    message = str(exc.value)
    assert "train-labels-idx1-ubyte:" in message and "train-labels-idx1-ubyte.gz:" in message
    assert "empty file" in message and arrays  # both reasons are given


# ------------------------------------------------------------------------------ wrong content
def test_mnist_label_outside_0_9_is_refused_at_load(tmp_path):
    arrays = mnist_arrays()
    arrays["y_test"][3] = 12
    write_mnist(tmp_path, arrays)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: label 12 at index 3"):
        load_mnist(tmp_path)


def test_mnist_fewer_labels_than_images(tmp_path):
    arrays = mnist_arrays()
    arrays["y_train"] = arrays["y_train"][:-2]
    write_mnist(tmp_path, arrays)
    with pytest.raises(DataError, match="holds 12 images but .*train-labels.* holds 10 labels"):
        load_mnist(tmp_path)


def test_mnist_images_must_be_28x28(tmp_path):
    write_mnist(tmp_path, mnist_arrays(size=32))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: expected MNIST images"):
        load_mnist(tmp_path)


def test_cifar_images_must_be_3x32x32(tmp_path):
    batches = fake_cifar.fake_batches(20, 5)
    batches["test_batch"]["data"] = batches["test_batch"]["data"][:, :1024]  # 1x32x32
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in batches.items():
        (folder / name).write_bytes(fake_cifar.py2_pickle(batch))
    with pytest.raises(DataError, match=r"test_batch: expected data \(N, 3072\)"):
        load_cifar("cifar10", tmp_path)


def test_cifar_label_outside_classes_names_the_batch(tmp_path):
    batches = fake_cifar.fake_batches(20, 5)
    batches["data_batch_2"]["labels"][1] = 10
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in batches.items():
        (folder / name).write_bytes(fake_cifar.py2_pickle(batch))
    with pytest.raises(DataError, match=r"data_batch_2: label 10 at index 1 is outside 0..9"):
        load_cifar("cifar10", tmp_path)


def test_every_dataset_label_is_checked_at_load(monkeypatch):
    x = torch.zeros(4, 1, 2, 2)
    bad = TensorDataset("fake", x, torch.tensor([0, 1, 2, 3]), x, torch.tensor([0, 1, 5, 0]), 4)
    import normlab.data as data

    monkeypatch.setattr(data, "_DATASETS", dict(data._DATASETS))  # registered for this test only
    register_dataset("fake", lambda root: bad, needs_root=False)
    with pytest.raises(DataError, match="fake: test label 5 is outside its classes 0..3"):
        load_dataset("fake")


def test_gzip_without_gz_suffix_says_so(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28)))))
    with pytest.raises(DataError, match=r"gzip-compressed; name it train-images-idx3-ubyte\.gz"):
        read_idx(path)
    raw = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw.write_bytes(idx_bytes(np.zeros(3)))
    with pytest.raises(DataError, match="uncompressed IDX file: remove the .gz suffix"):
        read_idx(raw)


# ------------------------------------------------------------------------------ unreadable files
def test_directory_where_a_file_is_expected(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").mkdir()
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: is a directory"):
        load_mnist(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in fake_cifar.fake_batches(20, 5).items():
        (folder / name).write_bytes(fake_cifar.py2_pickle(batch))
    (folder / "data_batch_2").unlink()
    (folder / "data_batch_2").mkdir()
    with pytest.raises(DataError, match=r"data_batch_2: is a directory"):
        load_cifar("cifar10", tmp_path)
    (tmp_path / "c2" / "cifar-10-python.tar.gz").mkdir(parents=True)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: is a directory"):
        load_cifar("cifar10", tmp_path / "c2")


def test_permission_denied_is_a_data_error(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    target = tmp_path / "train-labels-idx1-ubyte.gz"
    if os.geteuid() != 0:
        target.chmod(0)
    else:  # root reads anything: make the read fail as it would for a user
        real = Path.read_bytes

        def read_bytes(self):
            if self == target:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: permission denied; .*chmod"):
        load_mnist(tmp_path)


def test_io_error_is_a_data_error(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    real = Path.read_bytes

    def read_bytes(self):
        if self.name.startswith("t10k-images"):
            raise OSError(5, "Input/output error")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match="t10k-images.*Input/output error.*download"):
        load_mnist(tmp_path)


def test_dataset_option_for_another_dataset_is_an_error(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(DataError, match="svhn_extra applies to data=svhn only"):
        load_dataset("mnist", str(tmp_path), {"svhn_extra": True})
    assert load_dataset("mnist", str(tmp_path), {"svhn_extra": False}).x_test.shape[0] == 5


# ------------------------------------------------------------------------------ the CLI
def _damage(case, folder):
    arrays = mnist_arrays()
    if case == "label":
        arrays["y_train"][0] = 200
    if case == "count":
        arrays["y_test"] = arrays["y_test"][:3]
    if case == "size":
        arrays = mnist_arrays(size=32)
    write_mnist(folder, arrays)
    images = folder / "train-images-idx3-ubyte.gz"
    if case == "deflate":
        packed = bytearray(images.read_bytes())
        packed[10] = 0x07
        images.write_bytes(bytes(packed))
    if case == "nosuffix":
        images.rename(folder / "train-images-idx3-ubyte")
    if case == "directory":
        images.unlink()
        images.mkdir()


@pytest.mark.parametrize("case", ["label", "count", "size", "deflate", "nosuffix", "directory"])
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, case):
    root = tmp_path / "mnist"
    root.mkdir()
    _damage(case, root)
    args = ["train", "data=mnist", f"data.root={root}", "epochs=1", f"out={tmp_path / 'runs'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("normlab: error: ") and str(root) in err[0]
