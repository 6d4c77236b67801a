"""Per-batch activations of a calibration walk: in memory up to a budget, on disk past it.

A walk keeps, for every tensor still needed, one array per calibration batch. For a large model
and calibration set those arrays outgrow memory (ResNet-50's first stage at 256 images of 224x224
is 0.8 GB per tensor), so `ActivationBudget` keeps arrays in memory while the arrays it kept and
that are still alive fit the budget, and writes the rest to a temporary folder, read back one
batch at a time. Accounting follows the arrays' lifetimes (weak references), so dropping a
tensor's batches frees its share of the budget and deletes its files. The folder is under the
system's temporary folder (``TMPDIR``); an array the disk there cannot take ends the run with a
one-line `InputError` saying how much was needed, before anything is written.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import weakref
from collections.abc import Iterator

import numpy as np

from onnx_lowrank.errors import InputError
from onnx_lowrank.memory import format_bytes

__all__ = ["ActivationBudget", "Batches", "DISK_MARGIN"]

#: Disk space left free when spilling: other files and processes need some too.
DISK_MARGIN = 256 << 20


class _OnDisk:
    """One batch's array in a file, deleted when nothing refers to it any more."""

    __slots__ = ("path", "dtype", "__weakref__")

    def __init__(self, path: pathlib.Path, dtype: np.dtype):
        self.path = path
        self.dtype = dtype
        weakref.finalize(self, _unlink, path)

    def load(self) -> np.ndarray:
        return np.load(self.path)


def _unlink(path: pathlib.Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class ActivationBudget:
    """Decides, array by array, whether a batch stays in memory or goes to disk.

    `limit` bytes of live arrays kept in memory at most; arrays past it are saved under a
    temporary folder, removed by `close()` (or when the budget is garbage collected).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.spilled = 0
        self._folder: tempfile.TemporaryDirectory | None = None
        self._count = 0

    def keep(self, value: np.ndarray) -> np.ndarray | _OnDisk:
        """`value` itself while the live arrays kept in memory fit `limit` with it, else a handle
        to a copy saved on disk."""
        if self.held + value.nbytes <= self.limit:
            self.held += value.nbytes
            weakref.finalize(value, self._freed, value.nbytes)
            return value
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="onnx-lowrank-activations-")
        folder = pathlib.Path(self._folder.name)
        free = shutil.disk_usage(folder).free
        if value.nbytes + DISK_MARGIN > free:
            raise InputError(f"calibration activations past the memory budget are kept on disk in {folder.parent}, "
                             f"which has {format_bytes(free)} free, too little for the next "
                             f"{format_bytes(value.nbytes)} (spilled so far: {format_bytes(self.spilled)}); "
                             "free space there, set TMPDIR to a larger disk, or lower --calib-count")
        path = folder / f"{self._count}.npy"
        self._count += 1
        np.save(path, value)
        self.spilled += value.nbytes
        return _OnDisk(path, value.dtype)

    def batches(self, values) -> Batches:
        """A `Batches` of these arrays, each kept or spilled by this budget."""
        return Batches(self.keep(np.asarray(value)) for value in values)

    def _freed(self, size: int) -> None:
        self.held -= size

    def close(self) -> None:
        """Delete the temporary folder and whatever is still in it."""
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


class Batches(list):
    """One tensor's arrays, a batch each; items on disk are loaded when read."""

    def __getitem__(self, index: int) -> np.ndarray:
        item = super().__getitem__(index)
        return item.load() if isinstance(item, _OnDisk) else item

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[index] for index in range(len(self)))

    @property
    def dtype(self) -> np.dtype:
        """The arrays' dtype, read without loading a batch from disk."""
        return super().__getitem__(0).dtype
