"""The run's memory budget (`--max-memory`): what one step may allocate, decided before it does.

The budget defaults to a safe share of the memory available when the run starts. Steps that grow
with the model or the calibration set ask it first: a layer's calibration statistics
(`statistics`: dense second moments cost ``D² · 8`` bytes per matrix, sample-space ones
``n · D · 8``), the activations a calibration walk keeps in memory before spilling to disk
(`activations`), and the outputs a validation holds for a task metric. A step that cannot fit
even in its bounded form ends the run with a one-line `InputError` naming the flag to change.
"""

from __future__ import annotations

import dataclasses
import os
import re

from onnx_lowrank.errors import InputError

__all__ = ["DEFAULT_SHARE", "MemoryBudget", "available_bytes", "format_bytes", "parse_size"]

#: Share of the available memory a run may use when --max-memory is not given.
DEFAULT_SHARE = 0.5
#: Shares of the budget: one layer's statistics, and calibration activations kept in memory.
STATISTICS_SHARE = 0.4
ACTIVATIONS_SHARE = 0.2
#: Activations kept in memory at most, whatever the budget (the rest wait on disk).
ACTIVATION_CAP = 512 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def available_bytes() -> int:
    """Memory available to new allocations now (`MemAvailable` on Linux, else physical memory)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str | int) -> int:
    """'4G', '512M', '1.5G' or a byte count -> bytes."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
        if match is None:
            raise InputError(f"--max-memory expects a size like 4G, 512M or a byte count, got '{text}'")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise InputError(f"--max-memory must be positive, got '{text}'")
    return value


def format_bytes(count: float) -> str:
    """A byte count for messages: '5.0 GiB'."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """`total` bytes for the run; the shares its steps may take."""

    total: int

    @classmethod
    def from_setting(cls, max_memory: str | int | None) -> MemoryBudget:
        """`--max-memory` as given, else `DEFAULT_SHARE` of the memory available now."""
        return cls(parse_size(max_memory) if max_memory is not None else int(DEFAULT_SHARE * available_bytes()))

    @property
    def statistics(self) -> int:
        """Bytes one layer's calibration statistics may take (accumulated and while fitted)."""
        return int(STATISTICS_SHARE * self.total)

    @property
    def activations(self) -> int:
        """Bytes of calibration activations a walk keeps in memory before spilling to disk."""
        return min(ACTIVATION_CAP, int(ACTIVATIONS_SHARE * self.total))

    def refuse(self, what: str, needed: float, allowed: float, remedy: str) -> InputError:
        """The one-line error of a step that does not fit, naming the flag that changes it."""
        return InputError(f"{what} needs {format_bytes(needed)}, more than the {format_bytes(allowed)} "
                          f"--max-memory {format_bytes(self.total)} allows for it; {remedy}")
