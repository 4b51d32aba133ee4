"""Reading the user's data files so that every failure is a :class:`DataError`, never bad data.

Three rules hold for every reader in :mod:`normlab.data`:

* an unreadable file (missing, a directory, no permission, an I/O error) is a ``DataError`` naming
  the file, never an ``OSError`` traceback;
* compressed data is always read to its end, so the format's own checksum is verified (gzip's
  CRC-32 and length trailer, bzip2's block CRCs, xz's check): a flipped bit is an error, not a
  silently wrong pixel;
* the message says what to do (download again, decompress, rename, chmod).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
XZ_MAGIC = b"\xfd7zXZ\x00"
REDOWNLOAD = "the file is damaged, download it again"

# What the compression libraries raise on damaged data: BadGzipFile is an OSError, a truncated
# stream is an EOFError, a corrupt deflate block is zlib.error, xz's is LZMAError.
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


def os_error_message(path: Path, exc: OSError, help_text: str = REDOWNLOAD) -> str:
    """One line for an ``OSError`` met while opening or reading ``path``."""
    if isinstance(exc, FileNotFoundError):
        return f"{path}: file not found; {help_text}"
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a directory, expected a file; {help_text}"
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied; make it readable (chmod u+r {path})"
    return f"{path}: cannot read the file ({exc.strerror or exc}); {help_text}"


def read_bytes(path: Path, help_text: str = REDOWNLOAD) -> bytes:
    """The whole content of ``path``; any failure is a ``DataError``."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(os_error_message(path, exc, help_text)) from None


def open_binary(path: Path, help_text: str = REDOWNLOAD):
    """``open(path, "rb")`` with failures as ``DataError``."""
    try:
        if Path(path).is_dir():
            raise IsADirectoryError(path)
        return open(path, "rb")
    except OSError as exc:
        raise DataError(os_error_message(path, exc, help_text)) from None


def gunzip(raw: bytes, path: Path) -> bytes:
    """Decompress a whole gzip file, verifying every member's CRC-32 and length."""
    try:
        return gzip.decompress(raw)
    except _DECOMPRESS_ERRORS as exc:
        raise DataError(f"{path}: corrupt gzip data ({_reason(exc)}); {REDOWNLOAD}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "the compressed stream ends early: the file is truncated"
    return str(exc) or type(exc).__name__


def _decompressing(f):
    """A reader over ``f``'s decompressed content, chosen by the file's magic bytes."""
    head = f.read(6)
    f.seek(0)
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=f, mode="rb")
    if head.startswith(BZIP2_MAGIC):
        return bz2.BZ2File(f)
    if head.startswith(XZ_MAGIC):
        return lzma.LZMAFile(f)
    return f


def read_tar_members(archive: Path, wanted: Iterable[str], help_text: str) -> dict[str, bytes]:
    """The bytes of the regular files named ``wanted`` (by base name) inside a tar archive.

    The archive is read as one stream, start to end: the decompressor reaches the end of the data,
    so a gzip archive's CRC-32 and length are checked (``tarfile`` alone stops after the last
    member it needs and never reads the trailer, so a damaged ``.tar.gz`` would load with wrong
    pixels). Only the first member of each name is kept.
    """
    wanted = set(wanted)
    found: dict[str, bytes] = {}
    with open_binary(archive, help_text) as f:
        try:
            stream = _decompressing(f)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    base = PurePosixPath(member.name).name
                    if member.isfile() and base in wanted and base not in found:
                        found[base] = tar.extractfile(member).read()
            # Read what follows the tar's end-of-archive blocks to the end of the compressed
            # stream: that is where the checksum is verified.
            while stream.read(1 << 20):
                pass
        except (tarfile.TarError, *_DECOMPRESS_ERRORS) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile) and exc.errno:
                raise DataError(os_error_message(archive, exc, help_text)) from None
            raise DataError(
                f"{archive}: cannot read the archive ({_reason(exc)}); it is damaged or not a "
                f"tar archive; {help_text}"
            ) from None
    return found


def looks_gzipped(raw: bytes) -> bool:
    return raw[:2] == GZIP_MAGIC


def existing_root(root, name: str, help_text: str) -> Path:
    """``data.root`` as a path that exists, or a ``DataError`` saying how to set it."""
    if root is None or str(root) == "":
        raise DataError(f"data={name} needs data.root=PATH; {help_text}")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root={path} does not exist; {help_text}")
    return path


def unit_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1] (one float copy, scaled in place)."""
    out = torch.from_numpy(pixels.astype(np.float32))
    return out.div_(255.0)
