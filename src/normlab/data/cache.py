"""A cache of decoded dataset files: uint8/int64 arrays as ``.npz`` in :func:`cache_dir`.

Decoding CIFAR means inflating a 163 MB gzip stream and unpickling six batches; reading the same
arrays back from an uncompressed ``.npz`` costs a fraction of that. An entry is named by the dataset
and a hash of the source paths, and stores a *key*: every source's resolved path, size and
modification time (ns). A source that changed (re-downloaded, edited, touched) no longer matches
the key and is decoded again, overwriting the entry; a damaged or unreadable entry is ignored.
Entries are written atomically (temporary file + rename), so a killed process never leaves half a
cache behind; a read-only cache folder only costs the speed-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .embedded import cache_dir

CACHE_FORMAT = 1  # bump when the stored arrays change meaning
_KEY = "__source_key__"


def source_key(sources: Sequence[Path]) -> str:
    """The identity of the decoded data: format version, each source's path, size and mtime."""
    entries = []
    for path in sources:
        st = Path(path).stat()
        entries.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return json.dumps({"format": CACHE_FORMAT, "sources": entries})


def cache_path(kind: str, sources: Sequence[Path]) -> Path:
    """Where the entry for ``sources`` lives: one file per (dataset, source paths)."""
    names = "\n".join(str(Path(p).resolve()) for p in sources)
    digest = hashlib.sha256(names.encode()).hexdigest()[:16]
    return cache_dir() / "decoded" / f"{kind}-{digest}.npz"


def load_cached(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored at ``path`` if its key is ``key``; ``None`` on a miss or a damaged file."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f[_KEY]) != key:
                return None
            return {name: f[name] for name in f.files if name != _KEY}
    except Exception:
        return None  # damaged or foreign: decode again rather than trust it


def save_cached(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write the entry atomically; failing to write only costs the speed-up (a warning)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_KEY: np.array(key)}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        warnings.warn(f"normlab: cannot write the data cache {path} ({exc})", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def cached_decode(
    kind: str,
    sources: Sequence[Path],
    decode: Callable[[], dict[str, np.ndarray]],
    valid: Callable[[dict[str, np.ndarray]], bool] = lambda arrays: True,
) -> dict[str, np.ndarray]:
    """``decode()``'s arrays, from the cache when ``sources`` are unchanged since they were stored.

    ``decode`` must validate what it returns (it raises ``DataError`` on bad files, and nothing bad
    is ever stored); ``valid`` re-checks a cache hit cheaply (shapes, label range).
    """
    try:
        key = source_key(sources)
    except OSError:
        return decode()  # a source that cannot even be stat'ed: decode reports it
    path = cache_path(kind, sources)
    arrays = load_cached(path, key)
    if arrays is not None and valid(arrays):
        return arrays
    arrays = decode()
    if _same_key(sources, key):  # a source that changed while decoding is not cached
        save_cached(path, key, arrays)
    return arrays


def _same_key(sources: Sequence[Path], key: str) -> bool:
    try:
        return source_key(sources) == key
    except OSError:
        return False
