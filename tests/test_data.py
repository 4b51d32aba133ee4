import gzip
import pickle
import tarfile

import numpy as np
import pytest
import torch

from normlab.data import (
    Augment,
    InMemoryLoader,
    load_cifar,
    load_dataset,
    load_digits,
    load_mnist,
    load_mnist1d,
    prepare_dataset,
    random_crop,
    random_flip,
    read_idx,
)
from normlab.errors import DataError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # CIFAR loads write a decoded cache: keep it out of the user's ~/.cache
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------ IDX / MNIST
def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reader_roundtrip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = load_mnist(tmp_path)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)
    torch.testing.assert_close(ds.x_train[:, 0], expected)
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_mnist(raw)
    assert load_dataset("mnist", str(tmp_path)).x_train.shape[0] == 12


def test_idx_truncated_file_names_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 28, 28)))[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        read_idx(path)


def test_idx_bad_magic_and_bad_gzip(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x12\x34\x08\x03garbage")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)
    gz = tmp_path / "y.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="y.gz.*gzip"):
        read_idx(gz)


def test_mnist_missing_file_says_how_to_get_it(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*download"):
        load_mnist(tmp_path)
    with pytest.raises(DataError, match="data.root"):
        load_dataset("mnist", None)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------ CIFAR
def cifar_batch(n, labels_key, classes, seed):
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        labels_key: rng.integers(0, classes, n).tolist(),
        b"batch_label": b"test",
    }


def write_cifar10(folder):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = cifar_batch(4, b"labels", 10, i)
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    return batches


def test_cifar10_folder_and_archive_agree(tmp_path):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py")
    from_parent = load_cifar("cifar10", tmp_path)
    from_folder = load_cifar("cifar10", tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_archive = load_cifar("cifar10", archive)
    for ds in (from_folder, from_archive):
        torch.testing.assert_close(ds.x_train, from_parent.x_train)
        assert torch.equal(ds.y_test, from_parent.y_test)
    assert from_parent.x_train.shape == (20, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32) / 255.0
    torch.testing.assert_close(from_parent.x_train[0], torch.from_numpy(first.astype(np.float32)))


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps(cifar_batch(6, b"fine_labels", 100, 0)))
    (folder / "test").write_bytes(pickle.dumps(cifar_batch(3, b"fine_labels", 100, 1)))
    ds = load_dataset("cifar100", str(tmp_path))
    assert ds.num_classes == 100 and ds.x_train.shape == (6, 3, 32, 32)


def test_cifar_corrupt_and_missing(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar("cifar10", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_cifar("cifar10", tmp_path)
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"definitely not a tar")
    with pytest.raises(DataError, match="broken.tar.gz"):
        load_cifar("cifar10", bad)


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="refusing"):
        load_cifar("cifar10", tmp_path)


# ------------------------------------------------------------------------------------ embedded
def test_digits_split_is_fixed():
    a, b = load_digits(), load_digits()
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert set(a.y_test.tolist()) == set(range(10))


def test_mnist1d_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    ds = load_mnist1d()
    assert (tmp_path / "mnist1d.npz").exists()
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    again = load_mnist1d()
    assert torch.equal(ds.x_train, again.x_train)
    (tmp_path / "mnist1d.npz").write_bytes(b"corrupt")  # a damaged cache is regenerated
    assert torch.equal(load_mnist1d().y_test, ds.y_test)


def test_prepare_resize_and_standardize():
    ds = prepare_dataset(load_digits(), resize=28, train_limit=100, test_limit=50)
    assert ds.x_train.shape == (100, 1, 28, 28) and ds.x_test.shape == (50, 1, 28, 28)
    assert abs(ds.x_train.mean().item()) < 1e-5
    assert abs(ds.x_train.std().item() - 1) < 1e-2


# ------------------------------------------------------------------------------------ loader
def make_loader(**kw):
    x = torch.arange(50, dtype=torch.float32).view(50, 1, 1)
    y = torch.arange(50)
    return InMemoryLoader(x, y, kw.pop("batch_size", 8), **kw)


def test_loader_covers_every_sample_once_and_is_seeded():
    a = make_loader(shuffle=True, seed=3)
    ys = torch.cat([y for _, y in a])
    assert sorted(ys.tolist()) == list(range(50))
    assert len(a) == 7
    b = make_loader(shuffle=True, seed=3)
    assert torch.equal(ys, torch.cat([y for _, y in b]))
    b.set_epoch(1)
    assert not torch.equal(ys, torch.cat([y for _, y in b]))
    c = make_loader(shuffle=True, seed=4)
    assert not torch.equal(ys, torch.cat([y for _, y in c]))


def test_loader_drop_last_and_sharding():
    loader = make_loader(shuffle=True, drop_last=True)
    assert len(loader) == 6 and all(y.shape[0] == 8 for _, y in loader)
    full = [y for _, y in make_loader(shuffle=True, seed=1)]
    ranks = [list(make_loader(shuffle=True, seed=1, rank=r, world_size=2)) for r in range(2)]
    for i, y in enumerate(full):
        assert torch.equal(torch.cat([ranks[0][i][1], ranks[1][i][1]]), y)
    with pytest.raises(ValueError, match="divisible"):
        make_loader(batch_size=7, world_size=2)


def test_random_crop_is_a_shift_of_the_padded_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    out = random_crop(x, 2, "zeros", g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, [2, 2, 2, 2])
    for n in range(16):
        matches = [
            (i, j)
            for i in range(5)
            for j in range(5)
            if torch.equal(out[n], padded[n, :, i : i + 8, j : j + 8])
        ]
        assert matches, f"sample {n} is not a crop of its padded input"
    reflect = random_crop(x, 2, "reflect", torch.Generator().manual_seed(0))
    assert reflect.shape == x.shape
    one_d = random_crop(torch.randn(4, 1, 40), 4, "reflect", g)
    assert one_d.shape == (4, 1, 40)


def test_random_crop_offsets_cover_the_range():
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(2000, 1, 5)
    x[..., 2] = 1.0  # a marker sample; its position after cropping reveals the offset
    out = random_crop(x, 1, "zeros", g)
    positions = out[:, 0].argmax(-1)
    counts = torch.bincount(positions, minlength=5)
    assert counts[[1, 2, 3]].min() > 500 and counts[[0, 4]].sum() == 0


def test_random_flip_probability():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(4.0).view(1, 1, 4).repeat(4000, 1, 1)
    assert torch.equal(random_flip(x, 1.0, g), x.flip(-1))
    assert torch.equal(random_flip(x, 0.0, g), x)
    flipped = (random_flip(x, 0.5, g)[:, 0, 0] == 3).float().mean().item()
    assert 0.45 < flipped < 0.55


def test_augment_validation_and_determinism():
    with pytest.raises(ValueError, match="padding_mode"):
        Augment(2, "edge")
    with pytest.raises(ValueError, match="probability"):
        Augment(flip=1.5)
    x = torch.randn(32, 1, 6, 6)
    a = InMemoryLoader(x, torch.zeros(32, dtype=torch.long), 8, augment=Augment(2, "zeros", 0.5))
    first = [b for b, _ in a]
    second = [b for b, _ in a]
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    assert not torch.equal(torch.cat(first), x)
