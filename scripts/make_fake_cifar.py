#!/usr/bin/env python3
"""Write a fake CIFAR-10 archive in the real format, and optionally time normlab's reader on it.

    python3 scripts/make_fake_cifar.py OUT_DIR              # 50000 + 10000 images, ~160 MB
    python3 scripts/make_fake_cifar.py OUT_DIR --time       # ... then time load_cifar on it
    python3 scripts/make_fake_cifar.py OUT_DIR --train 40 --test 10

The archive ``OUT_DIR/cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/`` with ``data_batch_1..5``,
``test_batch`` and ``batches.meta``, pickled as the real ones are: Python 2 pickles (protocol 2,
strings as byte strings), each batch a dict of ``data`` ((n, 3072) uint8 numpy array), ``labels``
(list of ints), ``batch_label`` and ``filenames``. Pixels are uniform in 0..127 (7 bits), so gzip
shrinks them about as much as it does the real photographs (real archive: 163 MiB).

``write_fake_cifar10`` is also used by the tests (small sizes).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import struct
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
LABEL_NAMES.append("truck")


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with every str/bytes written as a Python 2 byte string (``BINSTRING``), as
    cPickle wrote the real CIFAR batches (Python 3's protocol 2 would wrap bytes in
    ``_codecs.encode`` instead)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_byte_string(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_byte_string
    dispatch[str] = _save_byte_string


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def fake_batches(n_train: int, n_test: int, seed: int = 0) -> dict[str, dict]:
    """The six batches as dicts (str keys, as in Python 2); train split over five batches."""
    rng = np.random.default_rng(seed)
    sizes = [len(part) for part in np.array_split(np.arange(n_train), 5)] + [n_test]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for k, (name, n) in enumerate(zip(names, sizes)):
        label = f"training batch {k + 1} of 5" if k < 5 else "testing batch 1 of 1"
        batches[name] = {
            "batch_label": label,
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 128, (n, 3072), dtype=np.uint8),
            "filenames": [f"fake_{k}_{i}.png" for i in range(n)],
        }
    return batches


def write_fake_cifar10(
    out_dir: str | os.PathLike, n_train: int = 50000, n_test: int = 10000, seed: int = 0
) -> tuple[Path, dict[str, dict]]:
    """Write ``out_dir/cifar-10-python.tar.gz``; return its path and the batches it holds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = fake_batches(n_train, n_test, seed)
    meta = {"num_cases_per_batch": 10000, "label_names": LABEL_NAMES, "num_vis": 3072}
    members = {name: py2_pickle(batch) for name, batch in batches.items()}
    members["batches.meta"] = py2_pickle(meta)
    path = out_dir / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size, info.mtime, info.mode = len(data), 1244000000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path, batches


def _time_loads(archive: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["NORMLAB_CACHE"] = cache
        from normlab.data import load_cifar

        for label in ("first load (decode + write cache)", "second load (cache hit)"):
            start = time.perf_counter()
            ds = load_cifar("cifar10", archive)
            print(f"{label}: {time.perf_counter() - start:.2f} s  {ds}")
        entries = list(Path(cache).rglob("*.npz"))
        size = sum(p.stat().st_size for p in entries) / 2**20
        print(f"cache: {size:.0f} MiB in {len(entries)} file(s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time", action="store_true", help="time load_cifar on the archive")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path, _ = write_fake_cifar10(args.out_dir, args.train, args.test, args.seed)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.0f} MiB) in {time.perf_counter() - start:.1f} s")
    if args.time:
        _time_loads(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
