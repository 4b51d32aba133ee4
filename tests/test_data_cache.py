"""The decoded-CIFAR cache: a hit skips decoding, a changed source is decoded again, a damaged entry
is ignored, and what comes out of the cache equals what decoding gives."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import normlab.data.cifar as cifar
from normlab.data import load_cifar
from normlab.data.cache import cache_path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_fake_cifar.py"
_spec = importlib.util.spec_from_file_location("make_fake_cifar", SCRIPT)
fake_cifar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_cifar)


@pytest.fixture
def archive(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    path, batches = fake_cifar.write_fake_cifar10(tmp_path / "data", 30, 7)
    return path, batches


@pytest.fixture
def decodes(monkeypatch):
    """Counts the real decodes."""
    calls = []
    real = cifar._decode

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(cifar, "_decode", counting)
    return calls


def assert_same(a, b):
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_hit_skips_decoding_and_gives_the_same_tensors(archive, decodes, tmp_path):
    path, batches = archive
    first = load_cifar("cifar10", path)
    entry = cache_path("cifar10", [path])
    assert len(decodes) == 1 and entry.is_file()
    assert entry.parent.parent == tmp_path / "cache"
    assert not [p for p in entry.parent.iterdir() if p.suffix == ".tmp"]  # atomic: no leftovers
    second = load_cifar("cifar10", path.parent)  # same archive through its folder: same entry
    assert len(decodes) == 1
    assert_same(first, second)
    labels = sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert second.y_train.tolist() == labels
    assert second.x_test.dtype == torch.float32 and second.y_test.dtype == torch.int64


def test_changed_source_invalidates(archive, decodes):
    path, _ = archive
    load_cifar("cifar10", path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: mtime only
    load_cifar("cifar10", path)
    assert len(decodes) == 2
    # Re-downloaded with other content: size and mtime change, the new pixels are served.
    _, other = fake_cifar.write_fake_cifar10(path.parent, 30, 7, seed=1)
    ds = load_cifar("cifar10", path)
    assert len(decodes) == 3
    assert ds.y_test.tolist() == other["test_batch"]["labels"]
    load_cifar("cifar10", path)
    assert len(decodes) == 3  # and that is cached in turn, in the same entry
    assert len(list(cache_path("cifar10", [path]).parent.glob("*.npz"))) == 1


def test_folder_sources_are_keyed_per_batch(tmp_path, monkeypatch, decodes):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = fake_cifar.fake_batches(30, 7)
    for name, batch in batches.items():
        (folder / name).write_bytes(fake_cifar.py2_pickle(batch))
    load_cifar("cifar10", tmp_path)
    load_cifar("cifar10", folder)
    assert len(decodes) == 1
    batches["data_batch_4"]["labels"][0] = (batches["data_batch_4"]["labels"][0] + 1) % 10
    (folder / "data_batch_4").write_bytes(fake_cifar.py2_pickle(batches["data_batch_4"]))
    st = (folder / "data_batch_4").stat()
    os.utime(folder / "data_batch_4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds = load_cifar("cifar10", tmp_path)
    assert len(decodes) == 2
    assert ds.y_train[18].item() == batches["data_batch_4"]["labels"][0]  # 6+6+6 before it


def test_damaged_entry_is_decoded_again(archive, decodes):
    path, _ = archive
    first = load_cifar("cifar10", path)
    cache_path("cifar10", [path]).write_bytes(b"PK\x03\x04 not really a zip")
    again = load_cifar("cifar10", path)
    assert len(decodes) == 2
    assert_same(first, again)


def test_unwritable_cache_only_warns(archive, monkeypatch, tmp_path):
    path, _ = archive
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("NORMLAB_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="cannot write the data cache"):
        ds = load_cifar("cifar10", path)
    assert ds.x_train.shape == (30, 3, 32, 32)
