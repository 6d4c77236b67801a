"""Atomic file writes: a temporary file in the destination folder, then a rename.

A crash or an error never leaves a half-written file at the destination, and an existing file
there stays as it was until the new one is complete.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterable

__all__ = ["atomic_write_bytes", "atomic_write_pieces"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write `data` to `path` atomically, with the permissions a plain `open(path, "wb")` gives."""
    return atomic_write_pieces(path, (data,))


def atomic_write_pieces(path: str | os.PathLike, pieces: Iterable[bytes]) -> pathlib.Path:
    """Write the concatenation of `pieces` to `path` atomically (as `atomic_write_bytes`), one
    piece in memory at a time."""
    path = pathlib.Path(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False)
    staged = pathlib.Path(handle.name)
    try:
        with handle:
            for piece in pieces:
                handle.write(piece)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staged, 0o666 & ~_umask())
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return path
